// Compares a backend of sugam's portable kernels with the scalar reference, bit for bit: every GGUF
// type's products (1 to 17 activation rows, fp32 and bf16) and exact dequantization, decode
// attention over fp32 / bf16 / int8 caches, and the small layers. Built and run by
// tests/test_native_isas.py (natively for x86, under qemu-aarch64 for ARM). Prints one line per
// failure and a summary; exits 1 on any difference.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define SUGAM_API(NS)                                                                                                       \
  namespace sugam {                                                                                                        \
  namespace NS {                                                                                                           \
  const char* api_backend();                                                                                               \
  void api_matmul_f32(int64_t, const float*, int64_t, int64_t, const uint8_t*, int64_t, const float*, float*);          \
  void api_matmul_bf16(int64_t, const uint16_t*, int64_t, int64_t, const uint8_t*, int64_t, const float*, uint16_t*);   \
  void api_dequantize(int64_t, const uint8_t*, int64_t, int64_t, float*);                                                 \
  void api_attention(const float*, const void*, const void*, int, const float*, const float*, const int64_t*,             \
                     const int64_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);               \
  void api_layers_f32(const float*, const float*, const float*, const float*, const float*, int64_t, float*, float*,     \
                      float*);                                                                                             \
  void api_layers_bf16(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, int64_t,    \
                       uint16_t*, uint16_t*, uint16_t*);                                                                   \
  }                                                                                                                        \
  }
SUGAM_API(ref)
SUGAM_API(simd)

namespace {

std::mt19937 rng(1234);
int checks = 0, failures = 0;

template <typename T>
void expect_same(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  ++checks;
  if (a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0) return;
  ++failures;
  size_t i = 0;
  while (i < a.size() && std::memcmp(&a[i], &b[i], sizeof(T)) == 0) ++i;
  std::printf("DIFFERENT %s (first at %zu of %zu)\n", what.c_str(), i, a.size());
}

uint16_t half_bits(float f) {  // a normal fp16 value near f (f in [1e-3, 1))
  int e;
  const float m = std::frexp(f, &e);  // f = m * 2^e, m in [0.5, 1)
  const uint16_t man = static_cast<uint16_t>((m * 2 - 1) * 1024) & 0x3FF;
  return static_cast<uint16_t>(((e - 1 + 15) << 10) | man);
}

uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

struct TypeInfo { int64_t id; const char* name; int64_t block; };
const TypeInfo kTypes[] = {{2, "Q4_0", 64}, {3, "Q4_1", 64}, {6, "Q5_0", 64}, {7, "Q5_1", 64},
                           {8, "Q8_0", 64}, {12, "Q4_K", 256}, {13, "Q5_K", 256}, {14, "Q6_K", 256}};

// n valid packed rows of k values: random codes and bit planes, finite fp16 scales, 6-bit K sub-scales
std::vector<uint8_t> random_rows(const TypeInfo& t, int64_t n, int64_t k, int64_t& row_bytes) {
  int64_t code, high, scales;
  switch (t.id) {
    case 8: code = k; high = 0; scales = k / 16; break;
    case 2: code = k / 2; high = 0; scales = k / 16; break;
    case 6: code = k / 2; high = k / 8; scales = k / 16; break;
    case 3: code = k / 2; high = 0; scales = k / 8; break;
    case 7: code = k / 2; high = k / 8; scales = k / 8; break;
    case 12: code = k / 2; high = 0; scales = k / 64 + k / 16; break;
    case 13: code = k / 2; high = k / 8; scales = k / 64 + k / 16; break;
    default: code = k / 2; high = k / 4; scales = k / 128 + k / 16; break;
  }
  row_bytes = code + high + scales;
  std::vector<uint8_t> w(n * row_bytes);
  std::uniform_int_distribution<int> byte(0, 255), six(0, 63);
  std::uniform_real_distribution<float> mag(1e-3f, 2e-2f);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* s = w.data() + r * row_bytes + code + high;
    const int64_t halves = t.id == 12 || t.id == 13 ? k / 128 : t.id == 14 ? k / 256 : scales / 2;
    for (int64_t i = 0; i < halves; ++i) {
      const uint16_t h = half_bits(mag(rng)) | (t.id == 3 || t.id == 7 ? (byte(rng) & 1) << 15 : 0);
      std::memcpy(s + 2 * i, &h, 2);
    }
    if (t.id == 12 || t.id == 13)
      for (int64_t i = 2 * halves; i < scales; ++i) s[i] = static_cast<uint8_t>(six(rng));
  }
  return w;
}

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = bf16_bits(v[i]);
  return b;
}

void check_products() {
  for (const TypeInfo& t : kTypes) {
    const std::vector<int64_t> widths = t.block == 256 ? std::vector<int64_t>{256, 768} : std::vector<int64_t>{64, 192, 896};
    for (int64_t k : widths) {
      const int64_t n = 26;  // halves of 13: tiles of 8 and 5, groups of 4 and a remainder
      int64_t row_bytes;
      const std::vector<uint8_t> w = random_rows(t, n, k, row_bytes);
      std::vector<float> deq_ref(n * k), deq_simd(n * k);
      sugam::ref::api_dequantize(t.id, w.data(), n, k, deq_ref.data());
      sugam::simd::api_dequantize(t.id, w.data(), n, k, deq_simd.data());
      expect_same(deq_ref, deq_simd, std::string("dequantize ") + t.name + " k=" + std::to_string(k));
      const std::vector<float> bias = randn(n);
      for (int64_t rows : {1, 3, 17}) {
        std::vector<float> x = randn(rows * k);
        if (rows > 1) std::fill(x.begin() + k, x.begin() + 2 * k, 0.0f);  // an all-zero row: scale 0
        std::vector<float> y_ref(rows * n), y_simd(rows * n);
        sugam::ref::api_matmul_f32(t.id, x.data(), rows, k, w.data(), n, bias.data(), y_ref.data());
        sugam::simd::api_matmul_f32(t.id, x.data(), rows, k, w.data(), n, bias.data(), y_simd.data());
        const std::string what = std::string("matmul ") + t.name + " k=" + std::to_string(k) + " rows=" + std::to_string(rows);
        expect_same(y_ref, y_simd, what + " fp32");
        const std::vector<uint16_t> xb = to_bf16(x);
        std::vector<uint16_t> yb_ref(rows * n), yb_simd(rows * n);
        sugam::ref::api_matmul_bf16(t.id, xb.data(), rows, k, w.data(), n, nullptr, yb_ref.data());
        sugam::simd::api_matmul_bf16(t.id, xb.data(), rows, k, w.data(), n, nullptr, yb_simd.data());
        expect_same(yb_ref, yb_simd, what + " bf16");
        // and the products are right: close to the dequantized weights times x (int8 activations)
        double err = 0, norm = 0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t o = 0; o < n; ++o) {
            double exact = bias[o];
            for (int64_t i = 0; i < k; ++i) exact += static_cast<double>(deq_ref[o * k + i]) * x[r * k + i];
            err += (y_ref[r * n + o] - exact) * (y_ref[r * n + o] - exact);
            norm += exact * exact;
          }
        ++checks;
        if (!(std::sqrt(err / norm) < 0.02)) {
          ++failures;
          std::printf("INACCURATE %s: relative error %g\n", what.c_str(), std::sqrt(err / norm));
        }
      }
    }
  }
}

void check_attention() {
  // a context of three parts (core.h's ATTENTION_PART is 512) and one with a partial last tile; head
  // sizes with and without a remainder after 64 lanes
  for (const int64_t dim : {64, 80}) {
    const int64_t n = 3, heads = 6, kv_heads = 2, block_size = 16, max_blocks = 70, blocks = 160;
    const int64_t lens[n] = {1, 21, 1100};
    std::vector<int64_t> tables(n * max_blocks);
    for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int64_t>((i * 7) % blocks);  // scattered blocks
    const size_t cache_values = blocks * block_size * kv_heads * dim;
    const std::vector<float> q = randn(n * heads * dim), kf = randn(cache_values), vf = randn(cache_values);
    const std::vector<uint16_t> kb = to_bf16(kf), vb = to_bf16(vf);
    std::vector<int8_t> ki(cache_values), vi(cache_values);
    std::uniform_int_distribution<int> code(-127, 127);
    for (size_t i = 0; i < cache_values; ++i) { ki[i] = static_cast<int8_t>(code(rng)); vi[i] = static_cast<int8_t>(code(rng)); }
    std::vector<float> ks(blocks * block_size * kv_heads), vs(ks.size());
    for (size_t i = 0; i < ks.size(); ++i) { ks[i] = 0.01f + 0.001f * (i % 7); vs[i] = 0.02f - 0.001f * (i % 5); }
    const void* kc[3] = {kf.data(), kb.data(), ki.data()};
    const void* vc[3] = {vf.data(), vb.data(), vi.data()};
    for (int cache = 0; cache < 3; ++cache) {
      std::vector<float> out_ref(n * heads * dim), out_simd(n * heads * dim);
      const float* ksp = cache == 2 ? ks.data() : nullptr;
      const float* vsp = cache == 2 ? vs.data() : nullptr;
      sugam::ref::api_attention(q.data(), kc[cache], vc[cache], cache, ksp, vsp, tables.data(), lens, out_ref.data(), n, heads,
                                kv_heads, dim, block_size, max_blocks, 0.125f);
      sugam::simd::api_attention(q.data(), kc[cache], vc[cache], cache, ksp, vsp, tables.data(), lens, out_simd.data(), n, heads,
                                 kv_heads, dim, block_size, max_blocks, 0.125f);
      expect_same(out_ref, out_simd, "decode attention, head size " + std::to_string(dim) + ", cache " +
                                         std::string(cache == 0 ? "fp32" : cache == 1 ? "bf16" : "int8"));
    }
  }
}

void check_layers() {
  const int64_t h = 128;
  const std::vector<float> x = randn(h, 3.0f), w = randn(h), gu = randn(2 * h, 4.0f), c = randn(h), s = randn(h);
  std::vector<float> a0(h), b0(h), r0(h), a1(h), b1(h), r1(h);
  sugam::ref::api_layers_f32(x.data(), w.data(), gu.data(), c.data(), s.data(), h, a0.data(), b0.data(), r0.data());
  sugam::simd::api_layers_f32(x.data(), w.data(), gu.data(), c.data(), s.data(), h, a1.data(), b1.data(), r1.data());
  expect_same(a0, a1, "rms_norm fp32");
  expect_same(b0, b1, "silu_mul fp32");
  expect_same(r0, r1, "rotary fp32");
  const auto xb = to_bf16(x), wb = to_bf16(w), gub = to_bf16(gu), cb = to_bf16(c), sb = to_bf16(s);
  std::vector<uint16_t> c0(h), d0(h), e0(h), c1(h), d1(h), e1(h);
  sugam::ref::api_layers_bf16(xb.data(), wb.data(), gub.data(), cb.data(), sb.data(), h, c0.data(), d0.data(), e0.data());
  sugam::simd::api_layers_bf16(xb.data(), wb.data(), gub.data(), cb.data(), sb.data(), h, c1.data(), d1.data(), e1.data());
  expect_same(c0, c1, "rms_norm bf16");
  expect_same(d0, d1, "silu_mul bf16");
  expect_same(e0, e1, "rotary bf16");
  // silu itself: close to g / (1 + e^-g)
  ++checks;
  for (int64_t i = 0; i < h; ++i) {
    const double g = gu[i], expected = g / (1 + std::exp(-g)) * gu[h + i];
    if (std::fabs(b0[i] - expected) > 1e-5 * (1 + std::fabs(expected))) {
      ++failures;
      std::printf("INACCURATE silu_mul at %lld: %g vs %g\n", static_cast<long long>(i), b0[i], expected);
      break;
    }
  }
}

}  // namespace

int main() {
  std::printf("backend under test: %s; reference: %s\n", sugam::simd::api_backend(), sugam::ref::api_backend());
  check_products();
  check_attention();
  check_layers();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
