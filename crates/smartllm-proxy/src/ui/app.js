// SmartLLM cost dashboard: polls the admin JSON API of the listener that
// served this page and draws it with plain DOM and SVG (no library, no build).
// The admin token never reaches this script: the browser sends an HttpOnly
// session cookie the listener set at sign-in.
'use strict';

// Anything that goes wrong is shown on the page (and counted in #errors, which
// the end-to-end test reads), not only in the console.
const problems = [];
function reportProblem(msg) {
  problems.push(String(msg));
  const box = document.getElementById('errors');
  if (box) {
    box.hidden = false;
    box.dataset.count = String(problems.length);
    box.textContent = problems.join('\n');
  }
}
window.addEventListener('error', (e) => reportProblem(e.message || 'error'));
window.addEventListener('unhandledrejection', (e) => reportProblem('unhandled rejection: ' + e.reason));
const consoleError = console.error.bind(console);
console.error = (...args) => { reportProblem(args.map(String).join(' ')); consoleError(...args); };

const POLL_MS = 5000;
const SUGGEST_MS = 30000;
const RANGES = {
  '1h': { secs: 3600, bucket: 'hour' },
  '24h': { secs: 86400, bucket: 'hour' },
  '7d': { secs: 7 * 86400, bucket: 'hour' },
  '30d': { secs: 30 * 86400, bucket: 'day' },
};
const DIMS = ['model', 'app', 'key', 'provider'];
// What each split asks the ledger for, and a row's series name (apps are per tenant).
const DIM_QUERY = { model: 'model', app: 'tenant,app', key: 'key', provider: 'provider' };
const seriesName = (group, dim) => (dim === 'app' ? group.tenant + '/' + group.app : group[dim]);
// Colour-blind-friendly, distinct in print.
const PALETTE = ['#3b5bdb', '#12b886', '#f59f00', '#e64980', '#7048e8', '#1098ad', '#e8590c', '#74b816', '#adb5bd'];
const SVGNS = 'http://www.w3.org/2000/svg';

// `generation`: bumped by every tick; a refresh begun by an older one is stale.
// scope: 'fleet' (the fleet's ledger, when it shares costs through Redis)
// or 'gateway' (this one's); null until the first refresh asks.
const state = { range: '24h', dim: 'model', scope: null, asked: null, suggestAt: 0, suggest: null, refreshes: 0, timer: 0, generation: 0 };

// ---- small helpers --------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'style') Object.assign(node.style, v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function usd(v) {
  const a = Math.abs(v || 0);
  if (a === 0) return '$0';
  if (a >= 1000) return '$' + Math.round(v).toLocaleString('en-US');
  if (a >= 1) return '$' + v.toFixed(2);
  if (a >= 0.01) return '$' + v.toFixed(3);
  return '$' + v.toPrecision(2);
}
const int = (v) => Math.round(v || 0).toLocaleString('en-US');
const pct = (v) => (v * 100).toFixed(v >= 0.1 || v === 0 ? 0 : 1) + '%';

function duration(secs) {
  if (secs < 60) return secs + 's';
  const d = Math.floor(secs / 86400), hr = Math.floor((secs % 86400) / 3600), m = Math.floor((secs % 3600) / 60);
  if (d) return d + 'd ' + hr + 'h';
  if (hr) return hr + 'h ' + String(m).padStart(2, '0') + 'm';
  return m + 'm';
}

function replace(id, ...children) {
  const node = document.getElementById(id);
  node.replaceChildren(...children.flat());
  return node;
}
const setText = (id, text) => { document.getElementById(id).textContent = text; };
const empty = (text) => h('div', { class: 'empty' }, text);

// A colour per name, stable across refreshes and charts.
const colours = new Map();
function colour(name) {
  if (name === 'other') return PALETTE[PALETTE.length - 1];
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % (PALETTE.length - 1)]);
  return colours.get(name);
}

class AuthError extends Error {}

async function getJSON(path) {
  const r = await fetch(path, { credentials: 'same-origin', cache: 'no-store' });
  if (r.status === 401) throw new AuthError('signed out');
  if (!r.ok) return { _status: r.status };
  return r.json();
}

async function getText(path) {
  const r = await fetch(path, { credentials: 'same-origin', cache: 'no-store' });
  return r.ok ? r.text() : '';
}

// Prometheus text format -> [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

// ---- spend over time --------------------------------------------------------

function buckets(range) {
  const { secs, bucket } = RANGES[range];
  const step = bucket === 'hour' ? 3600 : 86400;
  const now = Math.floor(Date.now() / 1000);
  const first = Math.floor((now - secs) / step) * step;
  const out = [];
  for (let t = first; t <= now; t += step) out.push(t);
  return { times: out, step };
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function timeLabel(t, step, span) {
  const d = new Date(t * 1000);
  const day = d.toLocaleDateString('en-US', { month: 'short', day: 'numeric', timeZone: 'UTC' });
  if (step === 86400 || span > 2 * 86400) return day;
  return String(d.getUTCHours()).padStart(2, '0') + ':00';
}

function drawSpend(data) {
  const dim = state.dim;
  const rows = (data && data.rows) || [];
  const { times, step } = buckets(state.range);
  const index = new Map(times.map((t, i) => [t, i]));
  const bucketKey = RANGES[state.range].bucket;
  const totals = new Map();
  for (const r of rows) totals.set(seriesName(r.group, dim), (totals.get(seriesName(r.group, dim)) || 0) + r.cost_usd);
  const ranked = [...totals.entries()].sort((a, b) => b[1] - a[1]);
  const top = new Set(ranked.slice(0, 7).map((e) => e[0]));
  const names = ranked.filter((e) => top.has(e[0])).map((e) => e[0]);
  if (ranked.length > top.size) names.push('other');
  const series = new Map(names.map((n) => [n, new Array(times.length).fill(0)]));
  for (const r of rows) {
    const t = Date.parse(r.group[bucketKey]) / 1000;
    const i = index.get(Math.floor(t / step) * step);
    if (i === undefined) continue;
    const name = seriesName(r.group, dim);
    series.get(top.has(name) ? name : 'other')[i] += r.cost_usd;
  }
  const stackTotals = times.map((_, i) => names.reduce((a, n) => a + series.get(n)[i], 0));
  const max = niceMax(Math.max(0, ...stackTotals));

  const W = 960, H = 260, L = 62, R = 12, T = 12, B = 28;
  const pw = W - L - R, ph = H - T - B;
  const bw = pw / times.length;
  const gap = Math.min(4, bw * 0.2);
  const root = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Spend over time by ' + dim, 'data-series': names.length });
  const axis = s('g', { class: 'axis' });
  for (let k = 0; k <= 4; k++) {
    const y = T + ph - (ph * k) / 4;
    axis.append(s('line', { x1: L, x2: W - R, y1: y, y2: y, class: k ? '' : 'base' }));
    axis.append(s('text', { x: L - 8, y: y + 4, 'text-anchor': 'end' }, usd((max * k) / 4)));
  }
  const every = Math.max(1, Math.ceil(times.length / 12));
  const span = times.length * step;
  times.forEach((t, i) => {
    if (i % every) return;
    axis.append(s('text', { x: L + i * bw + bw / 2, y: H - 8, 'text-anchor': 'middle' }, timeLabel(t, step, span)));
  });
  root.append(axis);
  const bars = s('g', { class: 'bars' });
  times.forEach((t, i) => {
    let y = T + ph;
    for (const n of names) {
      const v = series.get(n)[i];
      if (v <= 0) continue;
      const hgt = Math.max(1, (v / max) * ph);
      y -= hgt;
      bars.append(s('rect', {
        class: 'bar', x: L + i * bw + gap / 2, y, width: Math.max(1, bw - gap), height: hgt,
        fill: colour(n), 'data-series': n, 'data-usd': v,
      }, s('title', {}, `${n} · ${new Date(t * 1000).toISOString().slice(0, step === 3600 ? 16 : 10).replace('T', ' ')} UTC · ${usd(v)}`)));
    }
  });
  root.append(bars);
  if (!rows.length) {
    replace('spend-chart', empty('No spend recorded in this range yet.'));
  } else {
    replace('spend-chart', root);
  }
  replace('spend-legend', names.map((n) => {
    const total = n === 'other'
      ? ranked.filter((e) => !top.has(e[0])).reduce((a, e) => a + e[1], 0)
      : totals.get(n);
    return h('span', {}, h('i', { style: { background: colour(n) } }), n, ' ', h('b', {}, usd(total)));
  }));
}

// ---- KPIs -----------------------------------------------------------------

function drawKpis(costs, cache) {
  const t = (costs && costs.total) || {};
  const spend = document.getElementById('kpi-spend');
  spend.textContent = usd(t.cost_usd || 0);
  spend.dataset.usd = String(t.cost_usd || 0);
  // The ledger counts whole hours: say which ones ("1 h" at 10:59 is
  // 09:00-10:59, not 59 minutes).
  const from = costs && typeof costs.from === 'string' ? costs.from : '';
  setText('kpi-spend-hint', from ? 'since ' + from.replace('T', ' ').replace(':00Z', ':00 UTC') : 'last ' + state.range);
  const req = document.getElementById('kpi-requests');
  req.textContent = int(t.requests);
  req.dataset.count = String(t.requests || 0);
  // Requests refused or failed (budgets, errors) cost nothing: the cost
  // per request is over the answered ones, or a refused key looks cheap.
  const failed = t.errors || 0;
  const answered = (t.requests || 0) - failed;
  setText('kpi-requests-hint', t.requests ? int(t.input_tokens) + ' in · ' + int(t.output_tokens) + ' out tokens' + (failed ? ' · ' + int(failed) + ' refused or failed' : '') : '');
  setText('kpi-avg', answered > 0 ? usd(t.cost_usd / answered) : '–');
  setText('kpi-tokens', answered > 0 ? int((t.input_tokens + t.output_tokens) / answered) + ' tokens an answered request' : '');
  setText('kpi-hit', cache.lookups ? pct(cache.rate) : '–');
  setText('kpi-hit-hint', cache.lookups ? int(cache.hits) + ' of ' + int(cache.lookups) + ' lookups, since start' : 'no lookups yet');
  const saved = document.getElementById('kpi-saved');
  saved.textContent = usd(t.saved_usd || 0);
  saved.dataset.usd = String(t.saved_usd || 0);
  const would = (t.cost_usd || 0) + (t.saved_usd || 0);
  setText('kpi-saved-hint', would > 0 ? pct((t.saved_usd || 0) / would) + ' of what it would have cost' : '');
}

// ---- cache ----------------------------------------------------------------

function cacheFigures(metrics) {
  const by = {};
  for (const m of metrics) {
    if (m.name === 'smartllm_cache_lookups_total') by[m.labels.result] = (by[m.labels.result] || 0) + m.value;
  }
  const exact = by.hit_exact || 0, semantic = by.hit_semantic || 0;
  const misses = Object.entries(by).filter(([k]) => k.startsWith('miss')).reduce((a, [, v]) => a + v, 0);
  const bypass = Object.entries(by).filter(([k]) => k.startsWith('bypass')).reduce((a, [, v]) => a + v, 0);
  const hits = exact + semantic, lookups = hits + misses;
  return { exact, semantic, misses, bypass, hits, lookups, rate: lookups ? hits / lookups : 0 };
}

function drawCache(c, stats, costs) {
  const t = (costs && costs.total) || {};
  const r = 52, C = 2 * Math.PI * r;
  const donut = s('svg', { viewBox: '0 0 140 140', width: 140, height: 140, id: 'cache-donut', 'data-rate': c.rate, role: 'img', 'aria-label': 'cache hit rate' },
    s('circle', { cx: 70, cy: 70, r, fill: 'none', stroke: '#eef0f3', 'stroke-width': 16 }),
    s('circle', { cx: 70, cy: 70, r, fill: 'none', stroke: '#12b886', 'stroke-width': 16, 'stroke-linecap': c.hits ? 'round' : 'butt',
      'stroke-dasharray': `${C * c.rate} ${C}`, transform: 'rotate(-90 70 70)', class: 'arc' }),
    s('text', { x: 70, y: 72, 'text-anchor': 'middle', class: 'donut-value' }, c.lookups ? pct(c.rate) : '–'),
    s('text', { x: 70, y: 90, 'text-anchor': 'middle', class: 'donut-label' }, 'hit rate'));
  const row = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
  replace('cache', donut, h('dl', { class: 'stats' },
    row('Exact hits', int(c.exact)),
    row('Semantic hits', int(c.semantic)),
    row('Misses', int(c.misses)),
    row('Not cacheable', int(c.bypass)),
    row('Saved (' + state.range + ')', usd(t.saved_usd || 0))));
  // The store's estimate (the in-memory exact-match layer holds only the recent ones).
  const entries = stats && stats.stats ? stats.stats.estimated_entries ?? stats.stats.l1_entries : undefined;
  setText('cache-entries', stats && stats.enabled === false ? 'cache off' : entries !== undefined ? int(entries) + ' entries' : '');
}

// ---- routing mix ----------------------------------------------------------

function drawRoutes(metrics, byRoute, byModel) {
  // Requests and cost per route and model in the range, from the ledger.
  // A ledger without the route dimension: requests since start from /metrics,
  // and each model's ledger cost shared out by its requests per route (≈).
  const exact = Boolean(byRoute && Array.isArray(byRoute.rows));
  const mix = new Map();
  const add = (route, model, n, cost) => {
    if (!mix.has(route)) mix.set(route, { models: new Map(), n: 0, cost: 0 });
    const r = mix.get(route);
    r.models.set(model, (r.models.get(model) || 0) + n);
    r.n += n;
    r.cost += cost;
  };
  if (exact) {
    for (const r of byRoute.rows) if (r.requests) add(r.group.route || '-', r.group.model, r.requests, r.cost_usd);
  } else {
    const counts = [];
    const modelReqs = new Map();
    for (const m of metrics) {
      if (m.name !== 'smartllm_requests_total' || m.labels.model === '-' || !m.value) continue;
      counts.push([m.labels.route || '-', m.labels.model, m.value]);
      modelReqs.set(m.labels.model, (modelReqs.get(m.labels.model) || 0) + m.value);
    }
    const modelCost = new Map(((byModel && byModel.rows) || []).map((r) => [r.group.model, r.cost_usd]));
    for (const [route, model, n] of counts) add(route, model, n, (modelCost.get(model) || 0) * n / modelReqs.get(model));
  }
  const routes = [...mix.entries()].map(([route, r]) => ({ route, ...r })).sort((a, b) => b.n - a.n);
  setText('routes-note', exact ? 'last ' + state.range : 'requests since start · cost ≈ last ' + state.range);
  if (!routes.length) return replace('routes', empty('No requests yet.'));
  replace('routes', routes.map((r) => {
    const models = [...r.models.entries()].sort((a, b) => b[1] - a[1]);
    return h('div', { class: 'route', 'data-route': r.route, 'data-usd': r.cost },
      h('div', { class: 'route-head' },
        h('span', { class: 'name' }, r.route === '-' ? 'direct (no route)' : r.route),
        h('span', { class: 'nums' }, int(r.n) + ' requests · ', h('b', {}, (exact ? '' : '≈') + usd(r.cost)),
          r.n ? ' · ' + usd(r.cost / r.n) + '/req' : '')),
      h('div', { class: 'stack' }, models.map(([m, k]) => h('div', {
        title: `${m}: ${int(k)} (${pct(k / r.n)})`, style: { width: (100 * k / r.n) + '%', background: colour(m) },
      }))),
      h('div', { class: 'stack-legend' }, models.map(([m, k]) => h('span', {}, h('i', { style: { background: colour(m) } }), m + ' ' + pct(k / r.n)))));
  }));
}

// ---- budgets ----------------------------------------------------------------

function drawBudgets(data) {
  const list = (data && data.budgets) || [];
  if (!list.length) return replace('budgets', empty('No budgets configured (budgets: in keys.yaml).'));
  const out = [];
  for (const b of list) {
    for (const [period, p] of Object.entries(b.periods || {})) {
      const used = p.used_ratio;
      const cls = used >= 1 ? 'bad' : used >= 0.8 ? 'warn' : '';
      const proj = p.limit_usd > 0 ? Math.min(1, p.projected_usd / p.limit_usd) : 0;
      let outlook;
      if (used >= 1) outlook = h('span', { class: 'bad' }, 'used up · ' + b.on_exceed);
      else if (p.refusing) outlook = h('span', { class: 'bad' }, 'refusing requests that could cost more than ' + usd(p.limit_usd - p.spent_usd) + ' · ' + b.on_exceed);
      else if (p.exhausted_in_secs !== null && p.exhausted_in_secs !== undefined) outlook = h('span', { class: 'bad' }, 'runs out in ' + duration(p.exhausted_in_secs));
      else outlook = h('span', {}, 'projected ' + usd(p.projected_usd) + ' at reset (' + duration(p.resets_in_secs) + ')');
      out.push(h('div', { class: 'budget', 'data-budget': b.budget, 'data-period': period, 'data-usd': p.spent_usd },
        h('div', { class: 'budget-head' },
          h('span', { class: 'name' }, b.budget, h('span', { class: 'tag' }, period)),
          h('span', {}, usd(p.spent_usd) + ' of ' + usd(p.limit_usd) + ' · ' + pct(used))),
        h('div', { class: 'meter', title: 'projected at reset: ' + usd(p.projected_usd) },
          h('div', { class: 'fill ' + cls, style: { width: Math.min(100, used * 100) + '%' } }),
          h('div', { class: 'proj', style: { left: 'calc(' + proj * 100 + '% - 1px)' } })),
        h('div', { class: 'budget-foot' }, h('span', {}, 'burn ' + usd(p.burn_usd_per_hour) + '/h'), outlook)));
    }
  }
  replace('budgets', out);
}

// ---- suggestions ----------------------------------------------------------

function drawSuggestions(data) {
  const rep = data && data.report;
  const pot = document.getElementById('kpi-potential');
  if (!rep) {
    pot.textContent = '–';
    setText('suggest-note', '');
    return replace('suggestions', empty(data && data._status === 409 ? 'The ledger is off.' : 'No suggestions.'));
  }
  pot.textContent = usd(rep.potential_saving_usd || 0);
  pot.dataset.usd = String(rep.potential_saving_usd || 0);
  const list = rep.suggestions || [];
  setText('suggest-note', (list.length > 5 ? 'top 5 of ' + list.length + ' · ' : '') +
    int(rep.requests) + ' requests, ' + usd(rep.cost_usd) + ' in 7 days');
  if (!list.length) return replace('suggestions', empty('Nothing to change: no cheaper model or cache setting would have saved money.'));
  replace('suggestions', list.slice(0, 5).map((sg) => h('div', { class: 'suggestion', 'data-usd': sg.saving_usd },
    h('div', { class: 'saving' }, usd(sg.saving_usd), h('small', {}, 'of ' + usd(sg.cost_usd))),
    h('div', {},
      h('div', { class: 'what' }, h('span', { class: 'kind' }, String(sg.kind).replace(/_/g, ' ')), sg.action),
      h('div', { class: 'meta' }, [
        sg.tenant + '/' + sg.app,
        sg.to_model ? sg.model + ' → ' + sg.to_model : sg.model,
        int(sg.requests) + ' requests',
        sg.quality ? 'quality ' + sg.quality[0].toFixed(2) + ' → ' + sg.quality[1].toFixed(2) : null,
      ].filter(Boolean).join(' · '))))));
}

// ---- most expensive requests -------------------------------------------------

function drawExpensive(data) {
  const list = (data && data.requests) || [];
  setText('expensive-note', data && data.capacity ? `the costliest of this gateway's last ${int(data.capacity)} requests · metadata only` : '');
  if (!list.length) return replace('expensive', empty('No requests in this range yet.'));
  const head = h('tr', {}, ['When (UTC)', 'Model', 'Route', 'Tenant / app', 'Key', 'Prompt', 'Cached', 'Output', 'Latency', 'Cache', 'Status', 'Cost']
    .map((c, i) => h('th', { class: i >= 5 && i <= 8 || i === 11 ? 'num' : '' }, c)));
  const rows = list.map((r) => h('tr', { 'data-usd': r.cost_usd, 'data-request': r.request_id, title: 'request id ' + r.request_id },
    h('td', {}, new Date(r.unix_ms).toISOString().slice(5, 19).replace('T', ' ')),
    h('td', {}, r.model, r.stream ? h('span', { class: 'pill' }, ' stream') : ''),
    h('td', {}, r.route || '–'),
    h('td', {}, r.tenant + ' / ' + r.app),
    h('td', {}, r.key),
    h('td', { class: 'num' }, int(r.prompt_tokens)),
    h('td', { class: 'num' }, int(r.cached_tokens)),
    h('td', { class: 'num' }, int(r.completion_tokens)),
    h('td', { class: 'num' }, Math.round(r.latency_ms) + ' ms'),
    h('td', {}, h('span', { class: 'pill' + (r.cache && r.cache.startsWith('hit') ? ' hit' : '') }, r.cache || '–')),
    h('td', {}, h('span', { class: 'pill' + (r.status >= 400 ? ' err' : '') }, r.status)),
    h('td', { class: 'num cost' }, usd(r.cost_usd))));
  replace('expensive', h('table', {}, h('thead', {}, head), h('tbody', {}, rows)));
}

// ---- the loop -----------------------------------------------------------------

function setStatus(kind, text) {
  const st = document.getElementById('status');
  st.className = 'status ' + kind;
  setText('status-text', text);
}

// Draws the figures for `generation`, unless a newer tick began while they
// were fetched (a click, a return to the tab): that one draws its own, and
// an older, slower answer must not be drawn over it.
async function refresh(generation) {
  if (state.scope === null || state.scope === 'fleet') await askFleet();
  // The costs' own scope; the requests, metrics and cache are this gateway's.
  const since = 'since=' + state.range + (state.scope === 'fleet' ? '&scope=fleet' : '');
  const bucket = RANGES[state.range].bucket;
  const wantSuggest = Date.now() - state.suggestAt > SUGGEST_MS;
  const [spend, byModel, byRoute, metricsText, cacheStats, budgets, expensive, suggest] = await Promise.all([
    getJSON(`/admin/costs?${since}&group_by=${bucket},${DIM_QUERY[state.dim]}&limit=10000`),
    getJSON(`/admin/costs?${since}&group_by=model`),
    getJSON(`/admin/costs?${since}&group_by=route,model`),
    getText('/metrics'),
    getJSON('/admin/cache/stats'),
    getJSON('/admin/budgets'),
    getJSON(`/admin/requests/expensive?since=${state.range}&limit=15`),
    wantSuggest ? getJSON('/admin/suggestions?since=7d') : Promise.resolve(state.suggest),
  ]);
  if (generation !== state.generation) return;
  if (wantSuggest) { state.suggest = suggest; state.suggestAt = Date.now(); }
  const metrics = parseMetrics(metricsText);
  const cache = cacheFigures(metrics);
  drawKpis(spend, cache);
  drawSpend(spend);
  drawCache(cache, cacheStats, spend);
  drawRoutes(metrics, byRoute && !byRoute._status ? byRoute : null, byModel);
  drawBudgets(budgets);
  drawSuggestions(suggest);
  drawExpensive(expensive);
  if (spend && spend._status === 409) setStatus('error', 'the ledger is off (no store)');
  else setStatus('live', 'live · updated ' + new Date().toLocaleTimeString('en-GB'));
  state.refreshes += 1;
  document.body.dataset.refreshes = String(state.refreshes);
}

// One polling loop: a tick started while a refresh is in flight (a click,
// a return to the tab) takes over, and the older tick neither draws nor
// schedules another, or each such click would leave one more loop running.
async function tick() {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  try {
    await refresh(generation);
  } catch (e) {
    if (e instanceof AuthError) { window.location.assign('/ui'); return; }
    if (generation === state.generation) setStatus('error', 'cannot reach the gateway · retrying');
  }
  if (generation !== state.generation) return;
  state.timer = setTimeout(tick, document.hidden ? POLL_MS * 6 : POLL_MS);
}

// Does this gateway share a fleet's costs (`fleet.share_costs`)? Asked
// once; the fleet's view is then the default, as the budgets are the
// fleet's too.
async function askFleet() {
  if (state.asked !== null) return;
  const r = await getJSON('/admin/costs?since=1h&group_by=model&limit=1&scope=fleet');
  state.asked = !r._status;
  if (!state.asked) state.scope = 'gateway';
  else if (state.scope === null) state.scope = 'fleet';
  document.getElementById('scopes').hidden = !state.asked;
  syncControls();
}

function readHash() {
  const p = new URLSearchParams(window.location.hash.slice(1));
  if (RANGES[p.get('range')]) state.range = p.get('range');
  if (DIMS.includes(p.get('by'))) state.dim = p.get('by');
  if (['fleet', 'gateway'].includes(p.get('scope'))) state.scope = p.get('scope');
}

function syncControls() {
  for (const b of document.querySelectorAll('#ranges button')) b.classList.toggle('on', b.dataset.range === state.range);
  for (const b of document.querySelectorAll('#dims button')) b.classList.toggle('on', b.dataset.dim === state.dim);
  for (const b of document.querySelectorAll('#scopes button')) b.classList.toggle('on', b.dataset.scope === state.scope);
  document.body.dataset.scope = state.scope || '';
  history.replaceState(null, '', '#range=' + state.range + '&by=' + state.dim + (state.asked ? '&scope=' + state.scope : ''));
}

function start() {
  readHash();
  syncControls();
  document.getElementById('ranges').addEventListener('click', (e) => {
    const b = e.target.closest('button');
    if (!b) return;
    state.range = b.dataset.range;
    syncControls();
    tick();
  });
  document.getElementById('scopes').addEventListener('click', (e) => {
    const b = e.target.closest('button');
    if (!b) return;
    state.scope = b.dataset.scope;
    syncControls();
    tick();
  });
  document.getElementById('dims').addEventListener('click', (e) => {
    const b = e.target.closest('button');
    if (!b) return;
    state.dim = b.dataset.dim;
    syncControls();
    tick();
  });
  document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
  tick();
}

start();
