// sugam's chat page: conversations kept in this browser (localStorage), answers streamed from the
// server's OpenAI API (/v1/chat/completions), reasoning shown apart from the answer.
import { renderMarkdown } from './markdown.js';

const $ = (id) => document.getElementById(id);
const ui = {
  newChat: $('new-chat'), conversations: $('conversations'), model: $('model'), settings: $('settings'),
  apiKey: $('api-key'), system: $('system-prompt'), temperature: $('temperature'), maxTokens: $('max-tokens'),
  thinkingBudget: $('thinking-budget'), error: $('error'), messages: $('messages'), composer: $('composer'),
  prompt: $('prompt'), send: $('send'), stop: $('stop'), regenerate: $('regenerate'),
};

// ---- state, kept in localStorage ----------------------------------------------------------------

const KEYS = { settings: 'sugam.settings', conversations: 'sugam.conversations', current: 'sugam.current' };
const FIELDS = { apiKey: ui.apiKey, system: ui.system, temperature: ui.temperature, maxTokens: ui.maxTokens,
                 thinkingBudget: ui.thinkingBudget };

function load(key, fallback) {
  try {
    const value = localStorage.getItem(key);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (err) {
    showError(`Could not save in this browser: ${err.message}`);
  }
}

const settings = { apiKey: '', model: '', system: '', temperature: '', maxTokens: '', thinkingBudget: '',
                   ...load(KEYS.settings, {}) };
let conversations = load(KEYS.conversations, []);  // newest first
if (!Array.isArray(conversations)) conversations = [];
let currentId = load(KEYS.current, null);
let active = null;  // the answer being streamed: {controller, conversation, message}

const uid = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

// A page closed mid-answer left that answer unfinished: mark it stopped.
for (const conversation of conversations) {
  for (const message of conversation.messages) {
    if (message.role === 'assistant' && message.streaming) { delete message.streaming; message.stopped = true; }
  }
}

function save() {
  store(KEYS.conversations, conversations);
  store(KEYS.current, currentId);
}

function current() {
  let conversation = conversations.find((c) => c.id === currentId);
  if (!conversation) {
    conversation = conversations[0] || createConversation();
    currentId = conversation.id;
  }
  return conversation;
}

function createConversation() {
  const conversation = { id: uid(), title: 'New chat', messages: [] };
  conversations.unshift(conversation);
  return conversation;
}

// ---- errors -------------------------------------------------------------------------------------

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = '';
}

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The message of an error response: OpenAI's {"error": {"message"}}, else the status.
async function httpError(response) {
  let text = '';
  try {
    text = await response.text();
    const body = JSON.parse(text);
    const error = body.error ?? body.detail;
    const message = typeof error === 'string' ? error : error?.message;
    if (message) return new HTTPError(response.status, `${response.status}: ${message}`);
  } catch {
    // not JSON: the text itself, below
  }
  const detail = text ? `: ${text.slice(0, 300)}` : '';
  return new HTTPError(response.status, `${response.status} ${response.statusText}${detail}`);
}

function explain(err) {
  return err.status === 401 ? `${err.message} — enter the server's API key in Settings.` : err.message;
}

function headers() {
  const h = { 'Content-Type': 'application/json' };
  if (settings.apiKey) h.Authorization = `Bearer ${settings.apiKey}`;
  return h;
}

// ---- models -------------------------------------------------------------------------------------

let modelsAsked = 0;  // only the latest listing counts (the key may change while one is under way)

async function loadModels() {
  const asked = ++modelsAsked;
  try {
    const response = await fetch('v1/models', { headers: headers() });
    if (!response.ok) throw await httpError(response);
    const models = (await response.json()).data || [];
    if (asked !== modelsAsked) return;
    const options = models.map((m) => {
      const label = m.parent ? `${m.id} (LoRA adapter on ${m.parent})` : m.id;
      const option = new Option(label, m.id);
      option.selected = m.id === settings.model;
      return option;
    });
    ui.model.replaceChildren(...options);
    if (!models.some((m) => m.id === settings.model) && models.length) settings.model = models[0].id;
    hideError();
    renderMessages();  // the empty-conversation hint names the model
  } catch (err) {
    if (asked !== modelsAsked) return;
    showError(`Could not list the models: ${explain(err)}`);
    if (err.status === 401) ui.settings.open = true;
  }
}

// ---- sidebar ------------------------------------------------------------------------------------

function renderSidebar() {
  const items = conversations.map((conversation) => {
    const li = document.createElement('li');
    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'conversation';
    open.textContent = conversation.title;
    open.title = conversation.title;
    if (conversation.id === currentId) open.setAttribute('aria-current', 'true');
    open.addEventListener('click', () => switchTo(conversation.id));
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'delete';
    remove.textContent = '×';
    remove.setAttribute('aria-label', `Delete conversation “${conversation.title}”`);
    remove.addEventListener('click', () => deleteConversation(conversation.id));
    li.append(open, remove);
    return li;
  });
  ui.conversations.replaceChildren(...items);
}

function switchTo(id) {
  currentId = id;
  save();
  render();
  ui.prompt.focus();
}

function newConversation() {
  const conversation = current();
  if (conversation.messages.length) switchTo(createConversation().id);
  else ui.prompt.focus();
}

function deleteConversation(id) {
  if (active && active.conversation.id === id) active.controller.abort();
  conversations = conversations.filter((c) => c.id !== id);
  if (id === currentId) currentId = conversations[0]?.id ?? null;
  current();
  save();
  render();
}

// ---- messages -----------------------------------------------------------------------------------

function messageElement(message) {
  const article = document.createElement('article');
  article.className = `message ${message.role}`;
  article.dataset.id = message.id;
  const who = document.createElement('h2');
  who.className = 'who';
  who.textContent = message.role === 'user' ? 'You' : message.model || 'Assistant';
  article.append(who);
  if (message.role === 'user') {
    const body = document.createElement('div');
    body.className = 'text';
    body.textContent = message.content;
    article.append(body);
    return article;
  }
  const reasoning = document.createElement('details');
  reasoning.className = 'reasoning';
  reasoning.open = isActive(message) && Boolean(message.reasoning) && !message.content;
  const summary = document.createElement('summary');
  const thought = document.createElement('div');
  thought.className = 'markdown thought';
  reasoning.append(summary, thought);
  const content = document.createElement('div');
  content.className = 'markdown content';
  const error = document.createElement('p');
  error.className = 'message-error';
  error.setAttribute('role', 'alert');
  const meta = document.createElement('p');
  meta.className = 'meta';
  article.append(reasoning, content, error, meta);
  fillAssistant(article, message);
  return article;
}

function isActive(message) {
  return active !== null && active.message === message;
}

function fillAssistant(article, message) {
  const part = (name) => article.querySelector(`:scope > .${name}`);
  const [reasoning, content, error, meta] = ['reasoning', 'content', 'message-error', 'meta'].map(part);
  reasoning.hidden = !message.reasoning;
  if (isActive(message)) {
    // The thought is open while it streams and folds when the answer starts (drawn together, so the
    // two never show at once); in between, the reader's own clicks decide.
    const phase = message.content ? 'answer' : message.reasoning ? 'thought' : '';
    if (phase !== (article.dataset.phase || '')) {
      if (phase === 'thought') reasoning.open = true;
      if (phase === 'answer' && article.dataset.phase === 'thought') reasoning.open = false;
      article.dataset.phase = phase;
    }
  }
  if (message.reasoning) {
    const thinking = isActive(message) && !message.content;
    reasoning.querySelector('summary').textContent = thinking ? 'Thinking…'
      : message.reasoningSeconds != null ? `Thought for ${message.reasoningSeconds.toFixed(1)} s` : 'Reasoning';
    reasoning.querySelector('.thought').replaceChildren(renderMarkdown(message.reasoning));
  }
  content.replaceChildren(renderMarkdown(message.content));
  error.hidden = !message.error;
  error.textContent = message.error || '';
  meta.textContent = statsText(message);
  article.setAttribute('aria-busy', String(isActive(message)));
}

function statsText(message) {
  const s = message.stats;
  const parts = [];
  if (s && s.tokens) {
    parts.push(`${s.exact ? '' : '≈'}${s.tokens} tokens`);
    if (s.rate) parts.push(`${s.rate.toFixed(1)} tok/s`);
    if (s.ttft) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  }
  if (message.stopped) parts.push('stopped');
  if (message.finish === 'length') parts.push('cut at the token limit');
  if (isActive(message) && !parts.length) parts.push('waiting for the first token…');
  return parts.join(' · ');
}

function renderMessages() {
  const conversation = current();
  if (!conversation.messages.length) {
    const hint = document.createElement('p');
    hint.className = 'empty';
    hint.textContent = settings.model ? `Ask ${settings.model} anything.` : 'Ask anything.';
    ui.messages.replaceChildren(hint);
  } else {
    ui.messages.replaceChildren(...conversation.messages.map(messageElement));
  }
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function render() {
  renderSidebar();
  renderMessages();
  updateControls();
}

// Redraws a streaming message at most once a frame; keeps the view at the bottom if it was there.
const dirty = new Set();
let frame = 0;

function redraw(message) {
  dirty.add(message);
  if (!frame) frame = requestAnimationFrame(flush);
}

function flush() {
  frame = 0;
  const pinned = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
  for (const message of dirty) {
    const article = ui.messages.querySelector(`article[data-id="${message.id}"]`);
    if (article) fillAssistant(article, message);
  }
  dirty.clear();
  if (pinned) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function updateControls() {
  const busy = active !== null;
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  const last = current().messages.at(-1);
  ui.regenerate.hidden = busy || !last;
}

// ---- streaming ----------------------------------------------------------------------------------

// The server-sent events of a response: parsed JSON objects, and the final '[DONE]'.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (data) yield data === '[DONE]' ? data : JSON.parse(data);
    }
  }
}

function number(text, parse, min) {
  const value = parse(text);
  return Number.isFinite(value) && value >= min ? value : undefined;
}

function requestBody(conversation, answer) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: 'system', content: settings.system });
  for (const m of conversation.messages) {
    if (m === answer) break;
    if (m.error || !m.content) continue;  // failed and empty answers do not go back to the model
    messages.push({ role: m.role, content: m.content });
  }
  return {
    model: settings.model || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number(settings.temperature, parseFloat, 0),
    max_tokens: number(settings.maxTokens, (t) => parseInt(t, 10), 1),
    max_thinking_tokens: number(settings.thinkingBudget, (t) => parseInt(t, 10), 0),
  };
}

async function generate(conversation) {
  const message = { id: uid(), role: 'assistant', model: settings.model, content: '', reasoning: '', streaming: true };
  conversation.messages.push(message);
  const controller = new AbortController();
  active = { controller, conversation, message };
  save();
  render();
  const started = performance.now();
  let first = 0;
  let last = 0;
  let chunks = 0;
  let usage = null;
  try {
    const response = await fetch('v1/chat/completions', {
      method: 'POST', headers: headers(), body: JSON.stringify(requestBody(conversation, message)),
      signal: controller.signal,
    });
    if (!response.ok) throw await httpError(response);
    for await (const event of events(response)) {
      if (event === '[DONE]') break;
      if (event.error) throw new Error(event.error.message || 'the server reported an error');
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning ?? '';  // the server sends both names
      const content = delta.content || '';
      if (reasoning || content) {
        last = performance.now();
        if (!first) first = last;
        chunks += 1;
        message.stats = stats(chunks, false, started, first, last);
      }
      message.reasoning += reasoning;
      if (content && !message.content && message.reasoning) message.reasoningSeconds = (last - first) / 1000;
      message.content += content;
      if (choice.finish_reason) message.finish = choice.finish_reason;
      redraw(message);
    }
    if (usage) message.stats = stats(usage.completion_tokens, true, started, first, last);
  } catch (err) {
    if (err.name === 'AbortError') message.stopped = true;
    else message.error = explain(err);
  } finally {
    delete message.streaming;
    active = null;
    save();
    const article = ui.messages.querySelector(`article[data-id="${message.id}"]`);
    if (article) fillAssistant(article, message);
    updateControls();
  }
}

function stats(tokens, exact, started, first, last) {
  const seconds = (last - first) / 1000;
  return { tokens, exact, rate: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
           ttft: first ? (first - started) / 1000 : null };
}

function send() {
  const text = ui.prompt.value.trim();
  if (!text || active) return;
  const conversation = current();
  conversation.messages.push({ id: uid(), role: 'user', content: text });
  if (conversation.title === 'New chat') conversation.title = text.replace(/\s+/g, ' ').slice(0, 60);
  ui.prompt.value = '';
  generate(conversation);
}

function regenerate() {
  if (active) return;
  const conversation = current();
  while (conversation.messages.at(-1)?.role === 'assistant') conversation.messages.pop();
  if (conversation.messages.length) generate(conversation);
  else render();
}

// ---- wiring -------------------------------------------------------------------------------------

for (const [key, input] of Object.entries(FIELDS)) {
  input.value = settings[key];
  input.addEventListener('change', () => {
    settings[key] = input.value;
    store(KEYS.settings, settings);
    if (key === 'apiKey') loadModels();
  });
}
ui.model.addEventListener('change', () => {
  settings.model = ui.model.value;
  store(KEYS.settings, settings);
});
ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener('click', () => active?.controller.abort());
ui.regenerate.addEventListener('click', regenerate);
ui.newChat.addEventListener('click', newConversation);

current();
save();
render();
loadModels();
