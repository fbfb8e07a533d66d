// hoard's status page: fetches /ui/api/status every few seconds and renders
// it. Text goes in with textContent only (never as HTML): image names come
// from clients.
'use strict';

const REFRESH_MS = 5000;
const state = { status: null, sortKey: 'size', sortDir: -1, filter: '' };

const $ = (id) => document.getElementById(id);
// Live regions are written only when their text changes: a screen reader
// would otherwise read them out at every refresh.
const say = (node, text) => { if (node.textContent !== text) node.textContent = text; };
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function duration(secs) {
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min`;
  if (secs < 86400) return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
  return `${Math.floor(secs / 86400)} d ${Math.floor((secs % 86400) / 3600)} h`;
}

function ago(unixSecs) {
  if (!unixSecs) return 'never';
  const secs = Math.max(0, Math.floor(Date.now() / 1000 - unixSecs));
  return secs < 10 ? 'just now' : `${duration(secs)} ago`;
}

function percent(ratio) {
  return ratio === null || ratio === undefined ? 'no requests yet' : `${(ratio * 100).toFixed(1)} %`;
}

// Each state has a word and a sign; the colour only repeats them.
function describe(registry) {
  switch (registry.state) {
    case 'ok': return ['✓ OK', 'ok'];
    case 'budget_low': return ['⚠ Rate-limit budget low: cached tags served without revalidating', 'warn'];
    case 'unreachable': return [`✕ Unreachable: ${registry.failures} failed request${registry.failures === 1 ? '' : 's'} in a row`, 'bad'];
    case 'circuit_open': return [`✕ Circuit open: not asked for ${duration(registry.retry_in_seconds)}`, 'bad'];
    case 'revalidating': return ['↻ Revalidating: the next request tries it again', 'warn'];
    case 'rate_limited': return [`⏸ Rate-limited: ${duration(registry.retry_in_seconds)} left`, 'warn'];
    default: return [registry.state, 'warn'];
  }
}

function limit(registry) {
  if (registry.remaining === null && registry.limit === null) return 'not announced';
  const window = registry.window_seconds ? ` per ${duration(registry.window_seconds)}` : '';
  const left = registry.remaining === null ? '?' : registry.remaining;
  const of = registry.limit === null ? '' : ` of ${registry.limit}`;
  return `${left}${of} pulls left${window}`;
}

function renderSummary(s) {
  const bad = s.registries.filter((r) => r.state !== 'ok');
  say($('summary'), bad.length === 0
    ? `All ${s.registries.length} registr${s.registries.length === 1 ? 'y' : 'ies'} OK · ${percent(s.recent.hit_ratio)} hits in the last 5 min`
    : `${bad.length} registr${bad.length === 1 ? 'y needs' : 'ies need'} attention: ${bad.map((r) => r.name).join(', ')}`);
  $('version').textContent = s.version;
  $('uptime').textContent = duration(s.uptime_seconds);
  $('updated').textContent = new Date().toLocaleTimeString();
  $('hit-recent').textContent = percent(s.recent.hit_ratio);
  $('hit-total').textContent = percent(s.total.hit_ratio);
  $('bytes-cache').textContent = bytes(s.total.cache_bytes);
  $('bytes-upstream').textContent = bytes(s.total.upstream_bytes);
  $('pulls-saved').textContent = String(s.total.pulls_saved);
}

function renderChart(points) {
  const bars = $('bars');
  const peak = Math.max(1, ...points.map((p) => p.requests));
  const width = 360 / Math.max(points.length, 360);
  const nodes = [];
  points.slice(-360).forEach((p, i) => {
    const x = 360 - (points.length - i) * width;
    const hits = p.requests - p.misses;
    const hitH = (hits / peak) * 78;
    const missH = (p.misses / peak) * 78;
    const title = `${new Date(p.t).toLocaleTimeString()}: ${hits} from the cache, ${p.misses} upstream`;
    const hit = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
    hit.setAttribute('class', 'hit');
    hit.setAttribute('x', x.toFixed(2)); hit.setAttribute('width', Math.max(width - 0.2, 0.3).toFixed(2));
    hit.setAttribute('y', (80 - hitH).toFixed(2)); hit.setAttribute('height', hitH.toFixed(2));
    const miss = hit.cloneNode();
    miss.setAttribute('class', 'miss');
    miss.setAttribute('y', (80 - hitH - missH).toFixed(2)); miss.setAttribute('height', missH.toFixed(2));
    const t = document.createElementNS('http://www.w3.org/2000/svg', 'title');
    t.textContent = title;
    const g = document.createElementNS('http://www.w3.org/2000/svg', 'g');
    g.append(t, hit, miss);
    nodes.push(g);
  });
  bars.replaceChildren(...nodes);
  $('chart-peak').textContent = points.length ? `(peak ${peak} lookups per 10 s)` : '(collecting: the first point comes within 10 s)';
}

function renderRegistries(registries) {
  const rows = registries.map((r) => {
    const [text, cls] = describe(r);
    return el('tr', { 'data-registry': r.name },
      el('th', { scope: 'row', text: r.name }),
      el('td', { class: `state ${cls}`, 'data-state': r.state, text }),
      el('td', { text: limit(r) }));
  });
  $('registries').tBodies[0].replaceChildren(...rows);
}

function renderDownloads(downloads) {
  $('no-downloads').hidden = downloads.length > 0;
  $('downloads').hidden = downloads.length === 0;
  const rows = downloads.map((d) => {
    const bar = el('progress', { 'aria-label': `${d.registry}/${d.repository} ${d.digest.slice(7, 19)}` });
    if (d.size) { bar.max = d.size; bar.value = d.received; }
    const of = d.size ? ` of ${bytes(d.size)}` : '';
    return el('tr', {},
      el('td', { text: `${d.registry}/${d.repository}` }),
      el('td', {}, el('code', { text: d.digest.slice(0, 19) })),
      el('td', {}, bar, ` ${bytes(d.received)}${of}`),
      el('td', { class: 'num', text: `${bytes(d.bytes_per_second)}/s` }),
      el('td', { class: 'num', text: String(d.readers) }));
  });
  $('downloads').tBodies[0].replaceChildren(...rows);
}

function renderImages(images) {
  const needle = state.filter.trim().toLowerCase();
  const shown = images.filter((i) => !needle
    || [i.registry, i.repository, i.tag, i.digest].some((v) => v.toLowerCase().includes(needle)));
  const key = state.sortKey;
  const value = (i) => (key === 'platforms' ? i.platforms.join(',') : i[key]);
  shown.sort((a, b) => {
    const x = value(a); const y = value(b);
    const order = typeof x === 'string' ? x.localeCompare(y) : (x > y) - (x < y);
    return order * state.sortDir;
  });
  const rows = shown.map((i) => el('tr', { 'data-image': `${i.registry}/${i.repository}:${i.tag}` },
    el('td', { text: i.registry }),
    el('th', { scope: 'row', text: i.repository }),
    el('td', { text: i.tag }),
    el('td', {}, el('code', { title: i.digest, text: i.digest.slice(0, 19) })),
    el('td', { text: i.platforms.length ? i.platforms.join(', ') : '–' }),
    el('td', { class: 'num', text: bytes(i.size) }),
    el('td', { text: ago(i.last_pulled) }),
    el('td', { text: i.pinned ? '📌 pinned' : 'no' })));
  $('images').tBodies[0].replaceChildren(...rows);
  say($('image-count'), needle
    ? `${shown.length} of ${images.length} images`
    : `${images.length} image${images.length === 1 ? '' : 's'}`);
  for (const th of $('images').tHead.rows[0].cells) {
    if (th.dataset.key === key) th.setAttribute('aria-sort', state.sortDir > 0 ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  }
}

function renderStore(store) {
  const use = $('store-use');
  use.max = Math.max(store.limit_bytes, 1);
  use.value = store.used_bytes;
  $('store-text').textContent = `${bytes(store.used_bytes)} of ${bytes(store.limit_bytes)} (${((store.used_bytes / Math.max(store.limit_bytes, 1)) * 100).toFixed(1)} %)`;
  $('disk-free').textContent = store.disk_free_bytes === null ? 'unknown' : bytes(store.disk_free_bytes);
  $('evicted-blobs').textContent = String(store.evicted_blobs);
  $('evicted-bytes').textContent = bytes(store.evicted_bytes);
}

function render() {
  const s = state.status;
  if (!s) return;
  renderSummary(s);
  renderChart(s.history);
  renderRegistries(s.registries);
  renderDownloads(s.downloads);
  renderImages(s.images);
  renderStore(s.store);
}

async function refresh() {
  try {
    const response = await fetch('/ui/api/status', { cache: 'no-store', credentials: 'same-origin' });
    if (!response.ok) throw new Error(`status ${response.status}`);
    state.status = await response.json();
    $('problem').hidden = true;
    render();
  } catch (e) {
    const problem = $('problem');
    problem.textContent = `Cannot reach hoard (${e.message}); showing what it said last.`;
    problem.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener('DOMContentLoaded', () => {
  for (const th of $('images').tHead.rows[0].cells) {
    th.querySelector('button').addEventListener('click', () => {
      const key = th.dataset.key;
      // Numbers and dates start largest first, names A to Z.
      const first = ['size', 'last_pulled', 'pinned'].includes(key) ? -1 : 1;
      state.sortDir = state.sortKey === key ? -state.sortDir : first;
      state.sortKey = key;
      render();
    });
  }
  $('filter').addEventListener('input', (e) => { state.filter = e.target.value; render(); });
  refresh();
});
