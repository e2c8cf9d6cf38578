// Ringleader dashboard: a small single-page app over the coordinator's JSON API (/api/v1).
// No framework and no build step. Each view builds its DOM once, then refresh() re-fetches its
// data every 2 s and updates tables and uPlot charts in place. All API strings reach the DOM
// through textContent / attributes (see el()), never through innerHTML.
'use strict';

const POLL_MS = 2000;
const TOKEN_KEY = 'ringleader.token';
const TERMINAL = ['completed', 'stopped', 'failed', 'diverged', 'early_stopped', 'cancelled'];
const CUT_OFF = new Set(['stopped', 'early_stopped', 'failed', 'diverged']); // curves ending early
const PALETTE = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#65a30d'];

// ---------------------------------------------------------------- DOM and formatting helpers

// el('a', {href: '#/', class: 'x', dataset: {k: 'v'}, onclick: f}, child, 'text', [more]) -> Element.
// Strings become text nodes, so API data is always escaped.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'style') Object.assign(e.style, v); // CSSOM, so a strict CSP needs no 'unsafe-inline'
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}

// API numbers may be the strings "NaN", "Infinity", "-Infinity" (diverged trials).
function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'NaN') return NaN;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return null;
}
function finite(v) { const n = num(v); return n != null && Number.isFinite(n) ? n : null; }

// Metrics and objectives: 4 significant digits; integers in full; non-finite as their text.
function fmt(v) {
  if (v == null) return '—';
  if (typeof v !== 'number') return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isSafeInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e7) return v.toExponential(3).replace(/\.?0+e/, 'e');
  return String(Number(v.toPrecision(4)));
}
// Integer fields (ids, counters, seeds): every digit, never exponent notation; null stays null.
const int = v => v == null ? null : Number.isInteger(v) ? BigInt(v).toString() : fmt(v);
function fmtBytes(b) {
  if (b == null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${i ? b.toFixed(1) : b} ${units[i]}`;
}
function dur(ms) {
  if (ms == null || !Number.isFinite(ms)) return '—';
  const s = Math.max(0, ms) / 1000;
  if (s < 1) return `${Math.round(ms)} ms`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}
// A relative time ("3 min ago") with the absolute local time as a tooltip.
function timeAgo(unixMs) {
  if (unixMs == null) return el('span', {class: 'muted', text: '—'});
  return el('span', {title: new Date(unixMs).toLocaleString(), text: `${dur(Date.now() - unixMs)} ago`});
}
function badge(state) {
  const s = state == null ? 'live' : String(state);
  return el('span', {class: `badge s-${s.replace(/[^a-z_]/gi, '')}`, text: s.replace(/_/g, ' ')});
}
const sweepHref = id => `#/sweeps/${encodeURIComponent(id)}`;
const trialHref = (id, n) => `${sweepHref(id)}/trials/${encodeURIComponent(n)}`;
const apiSweep = id => `/api/v1/sweeps/${encodeURIComponent(id)}`;
const trialColor = n => `hsl(${(n * 137.508) % 360}, 65%, 42%)`; // golden-angle hues: neighbours differ
const sum = xs => xs.reduce((a, b) => a + b, 0);

// A table; cols = [{label, num?}], rows = [[cell...]] or {attrs, cells}. Cells are nodes or text.
function table(cols, rows, empty = 'nothing yet') {
  const head = el('tr', null, cols.map(c => c instanceof Node ? c : el('th', {class: c.num ? 'num' : null, text: c.label})));
  const body = rows.map(r => {
    const cells = Array.isArray(r) ? r : r.cells;
    return el('tr', Array.isArray(r) ? null : r.attrs, cells.map((c, i) =>
      el('td', {class: cols[i] && cols[i].num ? 'num' : null}, c instanceof Node ? c : fmt(c))));
  });
  if (!rows.length) body.push(el('tr', null, el('td', {class: 'muted', colspan: cols.length, text: empty})));
  return el('table', null, el('thead', null, head), el('tbody', null, body));
}
// A definition-list style block of [label, value] pairs, skipping null values.
function kv(pairs, cls = '') {
  return el('dl', {class: `kv ${cls}`}, pairs.filter(p => p[1] != null).map(([k, v]) =>
    el('div', null, el('dt', {text: k}), el('dd', null, v instanceof Node ? v : fmt(v)))));
}
// Replace a node's children, flattening arrays and skipping null/false.
function fill(node, ...kids) { node.replaceChildren(...kids.flat(Infinity).filter(k => k != null && k !== false)); }
function section(title, ...children) { return el('section', {class: 'card'}, el('h2', {text: title}), ...children); }

// ---------------------------------------------------------------- API, token, errors

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function api(path) {
  const headers = {Accept: 'application/json'};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try { res = await fetch(path, {headers, cache: 'no-store'}); }
  catch (e) { throw new ApiError(0, `cannot reach the dashboard server (${e.message})`); }
  if (res.ok) return res.json();
  let msg = `${res.status} ${res.statusText}`;
  try { const body = await res.json(); if (body && body.error) msg = String(body.error); } catch (_) { /* not JSON */ }
  throw new ApiError(res.status, msg);
}

// The banner carries data-error="<message>" only while a call is failing.
function showError(err) {
  const b = document.getElementById('error');
  if (!err) { b.hidden = true; b.removeAttribute('data-error'); b.textContent = ''; return; }
  const msg = err.message || String(err);
  b.dataset.error = msg;
  b.textContent = err.status === 503 ? `${msg} (retrying every ${POLL_MS / 1000} s)` : msg;
  b.hidden = false;
}
function updateSignout() { document.getElementById('signout').hidden = !sessionStorage.getItem(TOKEN_KEY); }

// ---------------------------------------------------------------- charts

// One uPlot chart in a container carrying data-plot / data-points. set() redraws with setData
// when the series layout (key) is unchanged, and rebuilds the chart only when it changed.
class Chart {
  constructor(name, {height = 260, note} = {}) {
    this.height = height;
    this.u = null;
    this.key = null;
    this.meta = {}; // per-refresh data read by hooks, so hooks survive setData
    this.empty = el('div', {class: 'empty', text: 'no data yet'});
    this.box = el('div', {class: 'plot', dataset: {plot: name, points: '0'}}, this.empty);
    this.box.chart = this;
    this.note = el('p', {class: 'note', hidden: !note, text: note || ''});
  }
  set(key, makeOpts, data, points) {
    this.box.dataset.points = String(points);
    this.empty.hidden = points > 0;
    if (!points) return this.destroy();
    if (this.u && key === this.key) return this.u.setData(data);
    this.destroy();
    this.key = key;
    this.u = new uPlot({...makeOpts(), width: this.width(), height: this.height}, data, this.box);
  }
  width() { return Math.max(260, this.box.clientWidth || 600); }
  resize() { if (this.u) this.u.setSize({width: this.width(), height: this.height}); }
  destroy() { if (this.u) { this.u.destroy(); this.u = null; this.key = null; } }
}
let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => document.querySelectorAll('.plot').forEach(p => p.chart && p.chart.resize()), 150);
});
const countFinite = series => sum(series.map(s => s.filter(v => v != null && Number.isFinite(v)).length));
// y axis: ticks in fmt(), width = ticks (10) + gap (5) + the widest tick label as measured + slack;
// x axis: integer ticks (epochs, trials)
const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
const measure = document.createElement('canvas').getContext('2d');
function labelWidth(vals) {
  measure.font = AXIS_FONT;
  return Math.max(24, ...(vals || []).map(v => measure.measureText(String(v)).width));
}
const numAxis = label => ({label, labelSize: 18, font: AXIS_FONT, values: (u, vals) => vals.map(fmt),
  size: (u, vals) => Math.ceil(labelWidth(vals)) + 22});
const xAxis = label => ({label, labelSize: 18, font: AXIS_FONT, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]});

// Per-epoch metric plot (trial page): one series per metric name present.
function metricChart(chart, records, names, ylabel) {
  const xs = records.map(r => r.epoch);
  const ys = names.map(n => records.map(r => finite((r.metrics || {})[n])));
  chart.set(names.join(','), () => ({
    scales: {x: {time: false}},
    axes: [xAxis('epoch'), numAxis(ylabel)],
    series: [{label: 'epoch'}, ...names.map((n, i) => ({label: n, stroke: PALETTE[i % PALETTE.length], width: 2,
      spanGaps: true, value: (u, v) => fmt(v)}))],
  }), [xs, ...ys], countFinite(ys));
}

// ---------------------------------------------------------------- polling and routing

// Re-fetches the view every POLL_MS; never overlaps requests (the next one is scheduled only
// after the previous finished), skips while the tab is hidden, and kick() refreshes at once.
class Poller {
  constructor(view) { this.view = view; this.timer = null; this.busy = false; this.again = false; this.stopped = false; }
  async tick() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    if (this.busy) { this.again = true; return; }
    if (!document.hidden || !this.view.loaded) {
      this.busy = true;
      try {
        await this.view.refresh();
        if (this.stopped) return;
        this.view.loaded = true;
        this.view.root.dataset.ready = 'true';
        showError(null);
      } catch (e) {
        if (this.stopped) return;
        if (e.status === 401) { showTokenPage(e); return; }
        if (!(e instanceof ApiError)) console.error(e);
        showError(e);
      } finally { this.busy = false; }
    }
    if (this.stopped) return;
    if (this.again) { this.again = false; this.tick(); return; }
    this.timer = setTimeout(() => this.tick(), POLL_MS);
  }
  kick() { this.tick(); }
  stop() { this.stopped = true; clearTimeout(this.timer); }
}

let poller = null;
function mount(view) {
  if (poller) poller.stop();
  fill(document.getElementById('main'), view.root);
  updateSignout();
  if (view.refresh) { poller = new Poller(view); poller.tick(); } else poller = null;
}
function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(part => {
    try { return decodeURIComponent(part); } catch (_) { return part; } // malformed %-escapes
  });
  showError(null);
  if (parts[0] === 'sweeps' && parts.length === 2) mount(new SweepView(parts[1]));
  else if (parts[0] === 'sweeps' && parts[2] === 'trials' && parts.length === 4) mount(new TrialView(parts[1], parts[3]));
  else mount(new OverviewView());
  window.scrollTo(0, 0);
}

// 401: ask for a token (the server's message is in the error banner).
function showTokenPage(err) {
  sessionStorage.removeItem(TOKEN_KEY);
  const input = el('input', {type: 'password', name: 'token', autocomplete: 'current-password', placeholder: 'access token', required: true});
  const form = el('form', {class: 'card token', onsubmit: e => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    route();
  }},
  el('h1', {text: 'Sign in'}),
  el('p', {text: 'This cluster needs an access token. Paste the dashboard token, or open the link printed by the coordinator.'}),
  el('label', null, 'Token ', input), el('button', {type: 'submit', text: 'Sign in'}));
  mount({root: el('div', {dataset: {view: 'token'}}, form)});
  showError(err);
  input.focus();
}

// ---------------------------------------------------------------- overview

class OverviewView {
  constructor() {
    this.cluster = el('div');
    this.sweeps = el('div');
    this.root = el('div', {dataset: {view: 'overview'}}, section('Cluster', this.cluster), section('Sweeps and jobs', this.sweeps));
  }
  async refresh() {
    document.title = 'Ringleader';
    const [cluster, sweeps] = await Promise.all([api('/api/v1/cluster'), api('/api/v1/sweeps')]);
    this.renderCluster(cluster);
    this.renderSweeps(sweeps);
  }
  renderCluster(c) {
    const coords = table([{label: 'coordinator'}, {label: 'role'}, {label: 'lease'}], (c.coordinators || []).map(k => [
      el('code', {text: k.address}), k.leader ? badge('leader') : el('span', {class: 'muted', text: 'follower'}),
      k.lease ? el('code', {title: k.lease, text: String(k.lease).slice(0, 8)}) : '—']), 'no coordinators');
    const workers = table(
      [{label: 'worker'}, {label: 'host'}, {label: 'device'}, {label: 'CPU cores', num: true}, {label: 'GPUs'},
        {label: 'state'}, {label: 'running'}, {label: 'heartbeat', num: true}, {label: 'registered', num: true}],
      (c.workers || []).map(w => ({attrs: {dataset: {worker: w.id}}, cells: [
        el('code', {text: w.id}), el('span', {title: w.peer_address || '', text: w.host}), w.device || '—', int(w.cpu_cores),
        gpuSummary(w.gpus), badge(w.state),
        w.running ? el('a', {href: trialHref(w.running.sweep, w.running.trial),
          text: `${w.running.sweep} / trial ${w.running.trial}` + (w.running.attempt > 1 ? ` (attempt ${w.running.attempt})` : '')})
          : el('span', {class: 'muted', text: '—'}),
        w.last_heartbeat_ms_ago == null ? '—' : `${dur(w.last_heartbeat_ms_ago)} ago`, timeAgo(w.registered_at_unix_ms)]})),
      'no workers registered');
    fill(this.cluster, el('p', null, 'Leader: ', c.leader ? el('code', {text: c.leader}) : el('strong', {text: 'none'})),
      el('div', {class: 'scroll compact'}, coords), el('div', {class: 'scroll'}, workers));
  }
  renderSweeps(s) {
    const list = [...(s.sweeps || [])].sort((a, b) => (b.seq ?? 0) - (a.seq ?? 0)); // newest first
    const rows = list.map(w => ({attrs: {dataset: {sweep: w.id}}, cells: [
      el('a', {href: sweepHref(w.id), text: w.id}), w.name || '—', w.kind, badge(w.state), progress(w),
      w.summary && w.summary.best_objective != null
        ? el('span', {title: `trial ${w.summary.best_trial}`, text: fmt(num(w.summary.best_objective) ?? w.summary.best_objective)}) : '—',
      w.owner || '—', timeAgo(w.submitted_unix_ms)]}));
    const t = table([{label: 'id'}, {label: 'name'}, {label: 'kind'}, {label: 'state'}, {label: 'progress'},
      {label: 'best', num: true}, {label: 'owner'}, {label: 'submitted', num: true}], rows, 'no sweeps submitted yet');
    const bad = (s.unreadable || []).map(u => el('li', {text: typeof u === 'string' ? u : JSON.stringify(u)}));
    fill(this.sweeps, el('div', {class: 'scroll'}, t),
      bad.length ? el('div', {class: 'warn'}, 'Unreadable records:', el('ul', null, bad)) : null);
  }
}
function gpuSummary(gpus) {
  if (!gpus || !gpus.length) return el('span', {class: 'muted', text: 'none'});
  const groups = new Map(); // identical GPUs collapse to "2 × NVIDIA H200 (139.7 GiB)"
  for (const g of gpus) {
    const k = `${g.name} (${fmtBytes(g.memory_bytes)})`;
    groups.set(k, (groups.get(k) || 0) + 1);
  }
  return [...groups].map(([k, n]) => (n > 1 ? `${n} × ` : '') + k).join(', ');
}
function progress(s) {
  const c = s.summary && s.summary.trials;
  if (!c) return '—';
  const done = sum(TERMINAL.map(k => c[k] || 0));
  const total = s.max_trials ?? sum(Object.values(c));
  let text = `${done} of ${total} done`;
  if (c.running) text += `, ${c.running} running`;
  if (c.paused) text += `, ${c.paused} paused`;
  return text;
}

// ---------------------------------------------------------------- sweep page

const sweepPrefs = new Map();
class SweepView {
  constructor(id) {
    this.id = id;
    // the user's choices, kept across refreshes and across visits to this sweep in this tab:
    // sort {col, dir} (null: best objective first), state filter, learning-curve metric (null: objective)
    if (!sweepPrefs.has(id)) sweepPrefs.set(id, {sort: null, filter: 'all', metric: null});
    this.p = sweepPrefs.get(id);
    this.data = null;
    this.header = el('div', {class: 'card'});
    this.body = el('div');
    this.root = el('div', {dataset: {view: 'sweep'}}, this.header, this.body);
  }
  // The body is built once we know whether this is a job (single trial) or a sweep.
  build(kind) {
    this.kind = kind;
    if (kind === 'job') {
      this.trial = new TrialPanel();
      fill(this.body, this.trial.root);
      return;
    }
    this.filterSel = el('select', {onchange: () => { this.p.filter = this.filterSel.value; this.renderTable(); }});
    this.tableBox = el('div', {class: 'scroll'});
    this.history = new Chart('history');
    this.metricSel = el('select', {onchange: () => { this.p.metric = this.metricSel.value; poller && poller.kick(); }});
    this.curves = new Chart('curves', {note: 'Dashed lines ending in a hollow circle are trials cut off early (stopped by the scheduler, early-stopped, failed or diverged).'});
    this.parallel = new Chart('parallel', {height: 300});
    this.hover = el('p', {class: 'note', text: 'Hover a line to see its trial.'});
    this.importance = el('div', {class: 'bars', dataset: {plot: 'importance', points: '0'}});
    fill(this.body,
      section('Trials', el('div', {class: 'toolbar'}, el('label', null, 'State ', this.filterSel)), this.tableBox),
      el('div', {class: 'grid'},
        section('Optimisation history', this.history.box),
        section('Learning curves', el('div', {class: 'toolbar'}, el('label', null, 'Metric ', this.metricSel)), this.curves.box, this.curves.note)),
      el('div', {class: 'grid'},
        section('Parallel coordinates', this.parallel.box, this.hover),
        section('Parameter importance', this.importance)));
  }
  async refresh() {
    // the curves are fetched alongside unless this is known to be a job (a single trial)
    const q = this.p.metric ? `?metric=${encodeURIComponent(this.p.metric)}` : '';
    const [d, curves] = await Promise.all([api(apiSweep(this.id)),
      this.kind === 'job' ? null : api(`${apiSweep(this.id)}/curves${q}`).catch(e => e)]);
    if (this.kind !== d.sweep.kind) this.build(d.sweep.kind);
    this.data = d;
    this.renderHeader(d);
    if (this.kind === 'job') {
      const n = (d.trials && d.trials[0] ? d.trials[0].trial : 0);
      this.trial.render(await api(`${apiSweep(this.id)}/trials/${n}`), this.id);
      return;
    }
    if (curves instanceof Error) throw curves;
    this.renderTable();
    this.renderHistory(d);
    this.renderCurves(curves);
    this.renderParallel(d);
    this.renderImportance(d.importance);
  }
  renderHeader(d) {
    const s = d.sweep;
    const fe = d.final_estimate;
    document.title = `${s.name || s.id} · Ringleader`;
    fill(this.header,
      el('h1', null, s.name || s.id, ' ', badge(s.state), ' ', el('span', {class: 'kind', text: s.kind})),
      kv([['id', el('code', {text: s.id})],
        ['objective', s.objective_metric ? `${s.objective_metric} (${s.objective_mode})` : null],
        ['progress', s.kind === 'sweep' ? progress(s) : null],
        ['best', s.summary && s.summary.best_trial != null
          ? el('a', {href: trialHref(s.id, s.summary.best_trial), text: `${fmt(num(s.summary.best_objective))} (trial ${s.summary.best_trial})`}) : null],
        ['owner', s.owner], ['origin', s.origin],
        ['submitted', timeAgo(s.submitted_unix_ms)], ['finished', s.finished_unix_ms ? timeAgo(s.finished_unix_ms) : null]], 'meta'),
      s.failure ? el('div', {class: 'failure'}, el('strong', {text: 'Failed: '}), s.failure) : null,
      fe ? el('div', {class: 'estimate'}, el('strong', {text: 'Final estimate: '}),
        el('a', {href: trialHref(s.id, fe.trial), text: `trial ${fe.trial}`}), ` at epoch ${fe.epoch} — `,
        Object.entries(fe.metrics || {}).map(([k, v]) => `${k} ${fmt(num(v) ?? v)}`).join(', '),
        fe.selected_on_test ? el('span', {class: 'warn-inline', text: ' (selected on the test set: optimistic)'}) : null) : null,
      s.spec ? el('details', null, el('summary', {text: 'spec'}), el('pre', {text: s.spec})) : null);
  }
  // Rows merge `trials` (every trial, in order) with the leaderboard's attempts/error/stop reason.
  rows() {
    const d = this.data;
    const lb = new Map((d.leaderboard || []).map(e => [e.trial, e]));
    const base = d.trials && d.trials.length ? d.trials : (d.leaderboard || []);
    return base.map(t => {
      const e = lb.get(t.trial) || {};
      return {trial: t.trial, state: t.state, objective: t.objective ?? e.objective, std: e.objective_std,
        epochs: t.epochs_done ?? e.epochs, config: t.config || e.config || {}, attempts: e.attempts,
        note: e.error || e.stop_reason || t.error || t.stop_reason || null};
    });
  }
  renderTable() {
    const d = this.data;
    const mode = d.sweep.objective_mode;
    const params = d.params || [];
    if (!this.p.sort) this.p.sort = {col: 'objective', dir: mode === 'min' ? 1 : -1};
    let rows = this.rows();
    // state filter options: every state present plus the current choice (kept across refreshes)
    const counts = {};
    rows.forEach(r => { counts[r.state] = (counts[r.state] || 0) + 1; });
    const states = [...new Set([...Object.keys(counts), ...(this.p.filter === 'all' ? [] : [this.p.filter])])].sort();
    fill(this.filterSel, el('option', {value: 'all', text: `all (${rows.length})`}),
      states.map(s => el('option', {value: s, text: `${s.replace(/_/g, ' ')} (${counts[s] || 0})`})));
    this.filterSel.value = this.p.filter;
    if (this.p.filter !== 'all') rows = rows.filter(r => r.state === this.p.filter);

    const cols = [['trial', 'trial', true], ['state', 'state'], ['objective', 'objective', true], ['epochs', 'epochs', true],
      ...params.map(p => [`p:${p}`, p, null]), ['attempts', 'attempts', true], ['note', 'error / stop reason']];
    const value = (r, col) => col.startsWith('p:') ? r.config[col.slice(2)] : r[col];
    // numbers (finite) sort before strings; missing and non-finite values always last
    const {col, dir} = this.p.sort;
    rows.sort((a, b) => {
      const x = value(a, col), y = value(b, col);
      const fx = finite(x), fy = finite(y);
      const mx = x == null || (num(x) != null && fx == null), my = y == null || (num(y) != null && fy == null);
      if (mx || my) return mx - my || a.trial - b.trial;
      if (fx != null && fy != null) return (fx - fy) * dir || a.trial - b.trial;
      return String(x).localeCompare(String(y), undefined, {numeric: true}) * dir || a.trial - b.trial;
    });
    const head = cols.map(([key, label, isNum]) => {
      const isParamNum = key.startsWith('p:') && rows.some(r => typeof r.config[key.slice(2)] === 'number');
      const active = key === col;
      return el('th', {class: `sortable${isNum || isParamNum ? ' num' : ''}`, title: 'sort',
        'aria-sort': active ? (dir > 0 ? 'ascending' : 'descending') : null,
        onclick: () => { this.p.sort = {col: key, dir: active ? -dir : (key === 'objective' && mode === 'max' ? -1 : 1)}; this.renderTable(); }},
      label, active ? (dir > 0 ? ' ▲' : ' ▼') : '');
    });
    const best = d.sweep.summary && d.sweep.summary.best_trial;
    const body = rows.map(r => el('tr', {dataset: {trial: r.trial}, class: r.trial === best ? 'best' : null},
      el('td', {class: 'num'}, el('span', {class: 'swatch', style: {background: trialColor(r.trial)}}),
        el('a', {href: trialHref(d.sweep.id, r.trial), text: r.trial})),
      el('td', null, badge(r.state)),
      el('td', {class: 'num'}, fmt(num(r.objective) ?? r.objective), r.std != null ? ` ± ${fmt(num(r.std))}` : ''),
      el('td', {class: 'num', text: int(r.epochs) ?? '—'}),
      params.map(p => el('td', {class: typeof r.config[p] === 'number' ? 'num' : null, text: fmt(r.config[p])})),
      el('td', {class: 'num', text: int(r.attempts) ?? '—'}),
      el('td', {class: 'reason', text: r.note || ''})));
    if (!body.length) body.push(el('tr', null, el('td', {class: 'muted', colspan: cols.length, text: 'no trials'})));
    fill(this.tableBox, el('table', null, el('thead', null, el('tr', null, head)), el('tbody', null, body)));
  }
  // Objective per trial number (points) and the best-so-far step line.
  renderHistory(d) {
    const trials = d.trials || [];
    const max = d.sweep.objective_mode !== 'min';
    const xs = trials.map(t => t.trial);
    const ys = trials.map(t => finite(t.objective));
    let best = null;
    const bests = ys.map(y => (best = y == null ? best : best == null ? y : (max ? Math.max(best, y) : Math.min(best, y))));
    const metric = d.sweep.objective_metric || 'objective';
    this.history.set(metric, () => ({
      scales: {x: {time: false}},
      axes: [xAxis('trial'), numAxis(`${metric} (${max ? 'max' : 'min'})`)],
      series: [{label: 'trial'},
        {label: metric, stroke: '#2563eb', paths: () => null, points: {show: true, size: 8, fill: '#2563eb'}, value: (u, v) => fmt(v)},
        {label: 'best so far', stroke: '#d97706', width: 2, paths: uPlot.paths.stepped({align: 1}), points: {show: false}, value: (u, v) => fmt(v)}],
    }), [xs, ys, bests], countFinite([ys]));
  }
  // One line per trial over the union of epochs; cut-off trials are dashed with a hollow end marker.
  renderCurves(c) {
    const metrics = c.metrics || [];
    if (!this.p.metric) this.p.metric = c.metric;
    const opts = [...new Set([...metrics, c.metric])];
    if ([...this.metricSel.options].map(o => o.value).join() !== opts.join())
      fill(this.metricSel, ...opts.map(m => el('option', {value: m, text: m})));
    this.metricSel.value = this.p.metric;
    const trials = c.trials || [];
    const xs = [...new Set(trials.flatMap(t => t.epochs || []))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const ys = trials.map(t => {
      const a = new Array(xs.length).fill(null);
      (t.epochs || []).forEach((e, i) => { a[at.get(e)] = finite((t.values || [])[i]); });
      return a;
    });
    const lastFinite = arr => { for (let i = arr.length - 1; i >= 0; i--) if (arr[i] != null) return [i]; return null; };
    this.curves.note.hidden = !trials.some(t => CUT_OFF.has(t.state));
    this.curves.set(c.metric + '|' + trials.map(t => `${t.trial}:${t.state}`).join(), () => ({
      scales: {x: {time: false}},
      legend: {live: false},
      axes: [xAxis('epoch'), numAxis(c.metric)],
      series: [{label: 'epoch'}, ...trials.map(t => {
        const cut = CUT_OFF.has(t.state);
        return {label: `trial ${t.trial}${cut ? ` · ${t.state.replace(/_/g, ' ')}` : ''}`, stroke: trialColor(t.trial),
          width: cut ? 1.5 : 2, dash: cut ? [6, 4] : undefined, spanGaps: true, value: (u, v) => fmt(v),
          points: cut ? {show: false, size: 9, width: 2, fill: '#fff', filter: (u, si) => lastFinite(u.data[si])} : {size: 5}};
      })],
    }), [xs, ...ys], countFinite(ys));
  }
  // Parallel coordinates as uPlot lines over x = axis index, every axis normalised to 0..1.
  renderParallel(d) {
    const mode = d.sweep.objective_mode;
    const trials = (d.trials || []).filter(t => t.config);
    const axes = (d.params || []).map(p => makeAxis(p, trials.map(t => t.config[p])));
    axes.push(makeAxis(`${d.sweep.objective_metric || 'objective'} (${mode})`, trials.map(t => finite(t.objective))));
    const objAxis = axes[axes.length - 1];
    const xs = axes.map((_, i) => i);
    // colour by objective rank: 1 = best (orange, drawn last = on top), 0 = worst (blue)
    const goodness = t => { const v = objAxis.norm(finite(t.objective)); return v == null ? null : (mode === 'min' ? 1 - v : v); };
    const ranked = [...trials].sort((a, b) => (goodness(a) ?? -1) - (goodness(b) ?? -1));
    const ys = ranked.map(t => axes.map((ax, i) => ax.norm(i === axes.length - 1 ? finite(t.objective) : t.config[ax.param])));
    const color = g => g == null ? 'rgba(150,150,150,0.6)' : `hsla(${Math.round(220 - 195 * g)}, 75%, 45%, 0.85)`;
    this.parallel.meta = {axes};
    const hover = this.hover;
    const tight = this.parallel.width() / axes.length < 120; // slant the axis names when crowded
    const key = JSON.stringify([tight, axes.map(a => [a.name, a.min, a.max, a.cats]), ranked.map(t => [t.trial, goodness(t)])]);
    this.parallel.set(key, () => ({
      padding: [28, 70, 0, 60],
      legend: {show: false},
      cursor: {points: {show: false}, focus: {prox: 24}, drag: {x: false, y: false}},
      focus: {alpha: 0.25},
      scales: {x: {time: false, range: [-0.05, axes.length - 0.95]}, y: {auto: false, range: [-0.06, 1.06]}},
      axes: [{splits: () => xs, values: (u, v) => v.map(i => axes[i] ? axes[i].name : ''), grid: {stroke: '#9ca3af', width: 1},
        rotate: tight ? -25 : 0, size: tight ? 80 : 40},
        {show: false}],
      series: [{}, ...ranked.map(t => ({label: `trial ${t.trial}`, stroke: color(goodness(t)), width: 1.5, points: {show: false}}))],
      hooks: {
        draw: [u => drawAxisLabels(u, this.parallel.meta.axes)],
        setSeries: [(u, si) => {
          const t = si == null ? null : ranked[si - 1];
          hover.textContent = t ? `trial ${t.trial}: objective ${fmt(num(t.objective) ?? t.objective)}` : 'Hover a line to see its trial.';
        }],
      },
    }), [xs, ...ys], countFinite(ys));
  }
  renderImportance(imp) {
    const params = (imp && imp.params ? imp.params : []).map(p => ({name: p.name, v: finite(p.importance)}))
      .sort((a, b) => (b.v ?? -1) - (a.v ?? -1));
    const top = Math.max(1e-12, ...params.map(p => p.v ?? 0));
    this.importance.dataset.points = String(params.filter(p => p.v != null).length);
    fill(this.importance,
      ...params.map(p => el('div', {class: 'bar-row'}, el('span', {class: 'bar-name', text: p.name}),
        el('span', {class: 'bar-track'}, el('span', {class: 'bar', style: {width: `${((p.v ?? 0) / top * 100).toFixed(1)}%`}})),
        el('span', {class: 'num', text: fmt(p.v)}))),
      params.length ? null : el('p', {class: 'muted', text: 'not enough finished trials yet'}),
      imp && imp.method ? el('p', {class: 'note', text: imp.method}) : null);
  }
}

// A parallel-coordinates axis: numbers scale min..max (log10 when positive and spanning >= 100x);
// strings and booleans become category indices spread over 0..1.
function makeAxis(name, values) {
  const present = values.filter(v => v != null && !(typeof v === 'number' && !Number.isFinite(v)));
  if (!present.length) return {name, param: name, cats: [], norm: () => null};
  if (present.some(v => typeof v !== 'number')) {
    const cats = [...new Set(present.map(String))].sort();
    return {name, param: name, cats, norm: v => v == null ? null : cats.length < 2 ? 0.5 : cats.indexOf(String(v)) / (cats.length - 1)};
  }
  const min = Math.min(...present), max = Math.max(...present);
  const log = present.length > 0 && min > 0 && max / min >= 100;
  const f = log ? Math.log10 : x => x;
  return {name: log ? `${name} (log)` : name, param: name, min, max, cats: null,
    norm: v => (typeof v !== 'number' || !Number.isFinite(v)) ? null : max === min ? 0.5 : (f(v) - f(min)) / (f(max) - f(min))};
}

// uPlot draws no per-axis scales for parallel coordinates, so write min/max (or the categories)
// beside each vertical axis line.
function drawAxisLabels(u, axes) {
  const ctx = u.ctx;
  const px = devicePixelRatio || 1;
  ctx.save();
  ctx.font = `${11 * px}px system-ui, sans-serif`;
  ctx.lineWidth = 3 * px;
  ctx.strokeStyle = 'rgba(255,255,255,0.9)';
  ctx.fillStyle = '#374151';
  axes.forEach((ax, i) => {
    const x = u.valToPos(i, 'x', true);
    const labels = ax.cats ? ax.cats.map((c, j) => [c, ax.norm(c)]) : [[fmt(ax.max), 1], [fmt(ax.min), 0]];
    ctx.textAlign = i === axes.length - 1 ? 'right' : 'left';
    for (const [text, y] of labels) {
      const ty = u.valToPos(y, 'y', true) + (ax.cats ? 4 * px : y === 1 ? -6 * px : 14 * px);
      const tx = x + (ctx.textAlign === 'left' ? 4 : -4) * px;
      ctx.strokeText(text, tx, ty);
      ctx.fillText(text, tx, ty);
    }
  });
  ctx.restore();
}

// ---------------------------------------------------------------- trial details

// The details of one trial; used by the trial page and, for jobs, under the sweep header.
class TrialPanel {
  constructor() {
    this.summary = el('div', {class: 'card'});
    this.charts = [['trial-loss', 'loss'], ['trial-accuracy', 'accuracy'], ['trial-throughput', 'samples / s'],
      ['trial-epoch-time', 'epoch time (s)']].map(([name, label]) => ({chart: new Chart(name, {height: 220}), label}));
    this.metrics = el('div', {class: 'scroll'});
    this.attempts = el('div', {class: 'scroll attempts'});
    this.lineage = el('div');
    this.root = el('div', null, this.summary, section('Attempts', this.attempts),
      el('div', {class: 'grid'}, this.charts.map(c => section(c.label[0].toUpperCase() + c.label.slice(1), c.chart.box))),
      section('Metrics per epoch', this.metrics), section('Lineage', this.lineage));
  }
  render(t, sweepId) {
    const cfg = Object.entries(t.config || {}).sort(([a], [b]) => a.localeCompare(b));
    fill(this.summary,
      el('h2', null, el('a', {href: trialHref(sweepId, t.number), text: `Trial ${t.number}`}), ' ', badge(t.state)),
      kv([['sweep', el('a', {href: sweepHref(sweepId), text: sweepId})], ['objective', fmt(num(t.objective) ?? t.objective)],
        ['epochs done', int(t.epochs_done)], ['failures', int(t.failures)], ['bracket', int(t.bracket)],
        ['rung results', t.rung_results && t.rung_results.length ? t.rung_results.map(v => fmt(num(v) ?? v)).join(', ') : null],
        ['checkpoint', t.checkpoint ? el('code', {text: t.checkpoint}) : null], ['stop reason', t.stop_reason]], 'meta'),
      t.error ? el('div', {class: 'failure'}, el('strong', {text: 'Error: '}), t.error) : null,
      el('div', {class: 'config'}, el('h3', {text: 'Configuration'}),
        cfg.length ? kv(cfg.map(([k, v]) => [k, fmt(v)]), 'meta') : el('span', {class: 'muted', text: 'no parameters'})));

    const records = [...(t.metrics || [])].sort((a, b) => a.epoch - b.epoch);
    const names = [...new Set(records.flatMap(r => Object.keys(r.metrics || {})))].sort();
    const groups = [names.filter(n => /(^|_)loss$/.test(n)), names.filter(n => /(^|_)accuracy$/.test(n)),
      names.filter(n => n === 'samples_per_sec'), names.filter(n => n === 'epoch_seconds')];
    this.charts.forEach((c, i) => metricChart(c.chart, records, groups[i], c.label));
    fill(this.metrics, table([{label: 'epoch', num: true}, ...names.map(n => ({label: n, num: true}))],
      records.map(r => ({attrs: {dataset: {epoch: r.epoch}}, cells: [int(r.epoch), ...names.map(n => {
        const v = (r.metrics || {})[n];
        return el('span', {class: v != null && finite(v) == null ? 'bad' : null, text: fmt(num(v) ?? v)});
      })]})), 'no epochs reported yet'));

    fill(this.attempts, table([{label: '#', num: true}, {label: 'workers'}, {label: 'ring gen.', num: true},
      {label: 'epochs', num: true}, {label: 'started', num: true}, {label: 'ended', num: true}, {label: 'took', num: true},
      {label: 'outcome'}, {label: 'error'}],
    (t.attempts || []).map(a => ({attrs: {dataset: {attempt: a.number}}, cells: [int(a.number), (a.workers || []).join(', '),
      a.generation == null ? '—' : el('code', {text: int(a.generation)}), `${int(a.start_epoch)} → ${int(a.stop_epoch)}`, timeAgo(a.started_unix_ms),
      a.ended_unix_ms ? timeAgo(a.ended_unix_ms) : el('span', {class: 'muted', text: 'running'}),
      a.started_unix_ms ? dur((a.ended_unix_ms || Date.now()) - a.started_unix_ms) : '—',
      badge(a.outcome), el('span', {class: 'reason', text: a.error || ''})]})), 'no attempts yet'));

    const l = t.lineage;
    fill(this.lineage, ...(l ? [
      kv([['seed', l.seed == null ? null : el('code', {text: int(l.seed)})], ['spec sha256', l.spec_sha256 ? el('code', {text: l.spec_sha256}) : null],
        ['worker version', l.worker_version], ['worker commit', l.worker_commit ? el('code', {text: l.worker_commit}) : null]]),
      el('div', {class: 'scroll'}, table([{label: 'file'}, {label: 'size', num: true}, {label: 'sha256'}],
        (l.files || []).map(f => [el('code', {text: f.path}), fmtBytes(f.bytes),
          el('code', {title: f.sha256 || '', text: f.sha256 ? `${f.sha256.slice(0, 16)}…` : '—'})]), 'no files recorded'))]
      : [el('p', {class: 'muted', text: 'no lineage recorded for this trial'})]));
  }
}

class TrialView {
  constructor(sweep, n) {
    this.sweep = sweep;
    this.n = n;
    this.panel = new TrialPanel();
    this.root = el('div', {dataset: {view: 'trial'}},
      el('p', {class: 'crumbs'}, el('a', {href: '#/', text: 'overview'}), ' / ',
        el('a', {href: sweepHref(sweep), text: sweep}), ` / trial ${n}`), this.panel.root);
  }
  async refresh() {
    document.title = `${this.sweep} / trial ${this.n} · Ringleader`;
    this.panel.render(await api(`${apiSweep(this.sweep)}/trials/${encodeURIComponent(this.n)}`), this.sweep);
  }
}

// ---------------------------------------------------------------- start

// A "#token=..." link stores the token for this tab and drops it from the
// address bar; "#token=...&/sweeps/ID" then opens that view.
if (location.hash.startsWith('#token=')) {
  const [token, view] = location.hash.slice('#token='.length).split('&');
  if (token) sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(token));
  const target = view && view.startsWith('/') ? view : '/';
  history.replaceState(null, '', `${location.pathname}${location.search}#${target}`);
}
document.getElementById('signout').addEventListener('click', e => {
  e.preventDefault();
  sessionStorage.removeItem(TOKEN_KEY);
  history.replaceState(null, '', '#/');
  route();
});
document.addEventListener('visibilitychange', () => { if (!document.hidden && poller) poller.kick(); });
window.addEventListener('hashchange', route);
route();
