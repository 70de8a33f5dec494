// A small markdown renderer for model output: paragraphs, headings, lists, block quotes, rules,
// fenced code blocks, inline code, bold, italic, strikethrough and links.
// Safe by construction: it builds DOM nodes and puts all text in text nodes, never parsing model
// output as HTML; links are made only for http(s) URLs. Unfinished input (a stream cut mid-way,
// e.g. an open code fence) renders as far as it goes.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

// Copy buttons work where the clipboard API does (a secure context: localhost or https).
function codeBlock(code, lang) {
  const wrap = el('div', 'code-block');
  const pre = el('pre');
  const codeEl = el('code', lang ? `language-${lang}` : '', code);
  pre.append(codeEl);
  const bar = el('div', 'code-bar');
  bar.append(el('span', 'code-lang', lang || 'code'));
  if (navigator.clipboard) {
    const copy = el('button', 'copy', 'Copy');
    copy.type = 'button';
    copy.addEventListener('click', () => {
      navigator.clipboard.writeText(code).then(() => {
        copy.textContent = 'Copied';
        setTimeout(() => { copy.textContent = 'Copy'; }, 1500);
      }, () => { copy.textContent = 'Copy failed'; });
    });
    bar.append(copy);
  }
  wrap.append(bar, pre);
  return wrap;
}

// ---- blocks ---------------------------------------------------------------------------------

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }

    const fence = line.match(FENCE);
    if (fence) {
      const marker = fence[1];
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(marker[0].repeat(marker.length)) &&
                                   /^[`~]+$/.test(lines[i].trim()))) {
        body.push(lines[i]);
        i++;
      }
      i++; // the closing fence (or past the end of an unfinished block)
      parent.append(codeBlock(body.join('\n'), fence[2]));
      continue;
    }

    const heading = line.match(HEADING);
    if (heading) {
      const h = el(`h${heading[1].length}`);
      renderInline(heading[2], h);
      parent.append(h);
      i++;
      continue;
    }

    if (RULE.test(line)) { parent.append(el('hr')); i++; continue; }

    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) { inner.push(lines[i].replace(QUOTE, '')); i++; }
      const quote = el('blockquote');
      renderBlocks(inner, quote);
      parent.append(quote);
      continue;
    }

    const item = line.match(ITEM);
    if (item) { i = renderList(lines, i, parent); continue; }

    // A paragraph: lines up to a blank one or the start of another block.
    const text = [line.trim()];
    i++;
    while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) { text.push(lines[i].trim()); i++; }
    const p = el('p');
    renderInline(text.join('\n'), p);
    parent.append(p);
  }
}

// One list from lines[start]; items own the lines indented under them (nested lists, code).
function renderList(lines, start, parent) {
  const first = lines[start].match(ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? 'ol' : 'ul');
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = m[1].length + m[2].length + 1;
    const body = [m[3]];
    i++;
    while (i < lines.length) {
      const next = lines[i];
      if (!next.trim()) {
        // A blank line continues the item only if indented content follows.
        const after = lines[i + 1];
        if (after !== undefined && after.trim() && leading(after) > indent) { body.push(''); i++; continue; }
        break;
      }
      if (leading(next) <= indent && (ITEM.test(next) || isBlockStart(next))) break;
      body.push(next.slice(Math.min(leading(next), contentIndent)));
      i++;
    }
    const li = el('li');
    if (body.length === 1) renderInline(body[0], li);
    else renderBlocks(body, li);
    list.append(li);
    while (i < lines.length && !lines[i].trim()) {
      const after = lines[i + 1];
      const m2 = after && after.match(ITEM);
      if (m2 && m2[1].length === indent) { i++; } else break;
    }
  }
  parent.append(list);
  return i;
}

function leading(line) {
  return line.length - line.trimStart().length;
}

// ---- inline ---------------------------------------------------------------------------------

const SAFE_URL = /^https?:\/\/[^\s<>"]+$/i;

function renderInline(text, parent) {
  let plain = '';
  const flush = () => { if (plain) { parent.append(document.createTextNode(plain)); plain = ''; } };
  let i = 0;
  while (i < text.length) {
    const c = text[i];

    if (c === '\\' && i + 1 < text.length && /[\\`*_{}[\]()#+\-.!~>]/.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }

    if (c === '`') {
      const run = text.slice(i).match(/^`+/)[0];
      const end = text.indexOf(run, i + run.length);
      if (end > 0) {
        flush();
        parent.append(el('code', '', text.slice(i + run.length, end).replace(/\n/g, ' ').trim() || ' '));
        i = end + run.length;
        continue;
      }
    }

    if (c === '\n') {
      flush();
      parent.append(el('br'));
      i++;
      continue;
    }

    const emphasis = matchEmphasis(text, i);
    if (emphasis) {
      flush();
      const node = el(emphasis.tag);
      renderInline(emphasis.inner, node);
      parent.append(node);
      i = emphasis.end;
      continue;
    }

    if (c === '[') {
      const link = text.slice(i).match(/^\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)/);
      if (link) {
        flush();
        if (SAFE_URL.test(link[2])) {
          const a = el('a');
          a.href = link[2];
          a.rel = 'noopener noreferrer';
          a.target = '_blank';
          renderInline(link[1], a);
          parent.append(a);
        } else {
          renderInline(link[1], parent); // not a web link: keep the words, drop the target
        }
        i += link[0].length;
        continue;
      }
    }

    if ((c === 'h' || c === 'H') && /^https?:\/\//i.test(text.slice(i, i + 8)) && !/\w/.test(text[i - 1] || '')) {
      const url = text.slice(i).match(/^https?:\/\/[^\s<>"'`]+/i)[0].replace(/[.,;:!?)\]]+$/, '');
      if (SAFE_URL.test(url) && url.length > 8) {
        flush();
        const a = el('a', '', url);
        a.href = url;
        a.rel = 'noopener noreferrer';
        a.target = '_blank';
        parent.append(a);
        i += url.length;
        continue;
      }
    }

    plain += c;
    i++;
  }
  flush();
}

// **bold**, __bold__, *italic*, _italic_, ~~struck~~ opening at text[i]: {tag, inner, end} or null.
function matchEmphasis(text, i) {
  for (const [marker, tag] of [['**', 'strong'], ['__', 'strong'], ['~~', 'del'], ['*', 'em'], ['_', 'em']]) {
    if (!text.startsWith(marker, i)) continue;
    const after = text[i + marker.length];
    if (!after || /\s/.test(after)) continue;
    // _ inside a word (snake_case) is not emphasis
    if (marker[0] === '_' && /\w/.test(text[i - 1] || '')) continue;
    let end = text.indexOf(marker, i + marker.length + 1);
    while (end > 0 && (/\s/.test(text[end - 1]) || (marker.length === 1 && text[end + 1] === marker) ||
                       (marker[0] === '_' && /\w/.test(text[end + marker.length] || '')))) {
      end = text.indexOf(marker, end + marker.length + (marker.length === 1 && text[end + 1] === marker ? 1 : 0));
    }
    if (end < 0) continue;
    return { tag, inner: text.slice(i + marker.length, end), end: end + marker.length };
  }
  return null;
}

// Markdown text -> a DocumentFragment of plain DOM nodes.
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, '\n').split('\n'), fragment);
  return fragment;
}
