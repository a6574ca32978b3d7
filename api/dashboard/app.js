// The dashboard: a hash-routed page per section, each a `load` (API calls) and a `render`
// (HTML from the data). The current page reloads every 2 s while the tab is visible; a render
// that would not change the page leaves it alone, so focus, selection and scrolling stay put.

import { AuthError, session, call, get, post, put, del, url } from './api.js';
import { html, raw, when, ago, duration } from './html.js';
import { bars } from './chart.js';

const POLL_MS = 2000;
const PAGE = 50;
const STATES = ['pending', 'scheduled', 'running', 'retrying', 'dead', 'succeeded', 'canceled'];

const $ = (sel) => document.querySelector(sel);
const view = () => $('#view');

// ---- routing -------------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query = ''] = hash.split('?');
  const params = new URLSearchParams(query);
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  switch (parts[0]) {
    case undefined:
      return { section: 'overview', page: overview };
    case 'queues':
      if (parts[1]) return { section: 'overview', page: queuePage(parts[1], params) };
      return { section: 'overview', page: overview };
    case 'jobs':
      if (parts[1]) return { section: 'search', page: jobPage(parts[1]) };
      break;
    case 'dead':
      return { section: 'dead', page: deadSet };
    case 'search':
      return { section: 'search', page: searchPage(params.get('q') || '') };
    case 'schedules':
      return { section: 'schedules', page: schedulesPage };
    case 'backups':
      return { section: 'backups', page: backupsPage };
    case 'workers':
      return { section: 'workers', page: workersPage };
    default:
      break;
  }
  return { section: null, page: notFound };
}

const go = (hash) => {
  location.hash = hash;
};

// ---- the refresh loop ----------------------------------------------------------------------

let current = null; // { page, section, generation }
let generation = 0;
let timer = null;
let lastHtml = '';

async function show({ focus = false } = {}) {
  if (!session.key()) return showLogin('');
  const { page, section } = route();
  const gen = ++generation;
  current = { page, section, gen };
  lastHtml = '';
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  await refresh(gen);
  if (focus) {
    const h = view().querySelector('h1');
    if (h) {
      h.setAttribute('tabindex', '-1');
      h.focus();
    }
  }
}

async function refresh(gen) {
  clearTimeout(timer);
  if (gen !== generation) return;
  try {
    const data = await current.page.load();
    if (gen !== generation) return;
    paint(current.page.render(data).toString());
    setLive(true);
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof AuthError) return showLogin(e.message);
    setLive(false, e.message);
    if (!lastHtml) paint(html`<h1>${current.page.title || 'drover'}</h1><p class="problem" role="alert">${e.message}</p>`.toString());
  }
  schedule(gen);
}

function schedule(gen) {
  clearTimeout(timer);
  if (current?.page.live === false) return;
  // Hidden tabs poll nothing; becoming visible again refreshes at once (see below).
  if (document.visibilityState === 'hidden') return;
  timer = setTimeout(() => refresh(gen), POLL_MS);
}

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && current && session.key()) refresh(generation);
  else clearTimeout(timer);
});

// Replaces the view only when its HTML changed, and puts focus back on the element (by id)
// that had it.
function paint(markup) {
  if (markup === lastHtml) return;
  lastHtml = markup;
  const active = document.activeElement;
  const focusId = active && view().contains(active) ? active.id : null;
  const scroll = window.scrollY;
  view().innerHTML = markup;
  current?.page.after?.(view());
  if (focusId) document.getElementById(focusId)?.focus();
  window.scrollTo(0, scroll);
}

function setLive(ok, why = '') {
  const live = $('#live');
  live.hidden = false;
  live.classList.toggle('stale', !ok);
  $('#live-state').textContent = ok ? `live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}` : `not updating: ${why}`;
}

function toast(message) {
  const t = $('#toast');
  t.textContent = message;
  t.classList.add('shown');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove('shown'), 5000);
}

// Runs an operator action from a button; reports its outcome and reloads the page's data.
async function act(label, fn) {
  try {
    const result = await fn();
    toast(typeof result === 'string' ? result : `${label}: done`);
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    toast(`${label} failed: ${e.message}`);
  }
  lastHtml = '';
  await refresh(generation);
}

// ---- login ---------------------------------------------------------------------------------

function showLogin(reason) {
  clearTimeout(timer);
  generation++;
  session.clear();
  $('#login').hidden = false;
  $('#nav').hidden = true;
  $('#logout').hidden = true;
  $('#live').hidden = true;
  view().innerHTML = '';
  lastHtml = '';
  $('#login-reason').textContent = reason ? `Logged out: ${reason}` : '';
  $('#key').value = '';
  $('#key').focus();
}

function showApp() {
  $('#login').hidden = true;
  $('#nav').hidden = false;
  $('#logout').hidden = false;
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const key = $('#key').value.trim();
  if (!key) return;
  try {
    // Any read proves the key; the queue list is the first page anyway.
    await call('GET', '/v1/queues', undefined, key);
  } catch (e) {
    $('#login-reason').textContent = `Not logged in: ${e.message}`;
    $('#key').select();
    return;
  }
  session.set(key);
  $('#key').value = '';
  showApp();
  await show({ focus: true });
});

$('#logout').addEventListener('click', () => {
  showLogin('');
  $('#login-reason').textContent = 'Logged out.';
});

window.addEventListener('hashchange', () => show({ focus: true }));

// Buttons in the view carry `data-action`; one listener serves them all.
view().addEventListener('click', (ev) => {
  const button = ev.target.closest('button[data-action]');
  if (!button || !current?.page.actions) return;
  const action = current.page.actions[button.dataset.action];
  if (action) action(button.dataset, button);
});
view().addEventListener('change', (ev) => {
  if (ev.target.matches('input[type=checkbox][data-select]')) current?.page.onSelect?.(ev.target);
});
view().addEventListener('submit', (ev) => {
  const form = ev.target.closest('form[data-form]');
  if (!form || !current?.page.forms) return;
  ev.preventDefault();
  current.page.forms[form.dataset.form](new FormData(form));
});

// ---- shared pieces -------------------------------------------------------------------------

// Short on screen; the whole id for screen readers and on hover.
const jobLink = (id) =>
  html`<a href="#/jobs/${id}" class="mono" title="${id}" aria-label="Job ${id}">${id.slice(0, 8)}…${id.slice(-4)}</a>`;
const status = (s) => html`<span class="status status-${s}">${s}</span>`;
const short = (s, n = 120) => (s && s.length > n ? `${s.slice(0, n)}…` : s || '');

function jobTable(jobs, { empty = 'No jobs.', queue = true } = {}) {
  if (!jobs.length) return html`<p class="empty">${empty}</p>`;
  return html`<table>
    <thead><tr><th scope="col">Job</th>${queue ? html`<th scope="col">Queue</th>` : ''}<th scope="col">Kind</th>
      <th scope="col">Status</th><th scope="col" class="num">Attempts</th><th scope="col">Enqueued</th>
      <th scope="col">Finished</th><th scope="col">Last error</th></tr></thead>
    <tbody>${jobs.map(
      (j) => html`<tr>
        <td>${jobLink(j.id)}</td>${queue ? html`<td><a href="#/queues/${j.queue}">${j.queue}</a></td>` : ''}
        <td>${j.kind}</td><td>${status(j.status)}</td><td class="num">${j.attempts}/${j.max_attempts}</td>
        <td>${when(j.created_at)}</td><td>${when(j.finished_at)}</td>
        <td class="error">${short(j.last_error)}</td></tr>`,
    )}</tbody></table>`;
}

// ---- overview ------------------------------------------------------------------------------

const overview = {
  title: 'Queues',
  async load() {
    const [queues, activity] = await Promise.all([get('/v1/queues'), get(url('/v1/activity', { minutes: 60 }))]);
    return { queues: queues.queues, activity: activity.queues };
  },
  render({ queues, activity }) {
    const byQueue = new Map(activity.map((a) => [a.queue, a.minutes]));
    const label = (m) => new Date(m.minute).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', hour12: false });
    return html`<h1>Queues</h1>
      <table class="queues">
        <caption>Jobs per queue right now, and since each queue was created.</caption>
        <thead><tr><th scope="col">Queue</th><th scope="col" class="num">Pending</th><th scope="col" class="num">Scheduled</th>
          <th scope="col" class="num">Running</th><th scope="col" class="num">Dead</th><th scope="col" class="num">Succeeded (total)</th>
          <th scope="col" class="num">Failed attempts (total)</th></tr></thead>
        <tbody>${queues.map(
          (q) => html`<tr data-queue="${q.queue}">
            <th scope="row"><a href="#/queues/${q.queue}">${q.queue}</a></th>
            <td class="num" data-col="pending"><a href="#/queues/${q.queue}?state=pending">${q.depth}</a></td>
            <td class="num" data-col="scheduled"><a href="#/queues/${q.queue}?state=scheduled">${q.scheduled}</a></td>
            <td class="num" data-col="running"><a href="#/queues/${q.queue}?state=running">${q.running}</a></td>
            <td class="num ${q.dead ? 'bad' : ''}" data-col="dead"><a href="#/dead">${q.dead}</a></td>
            <td class="num">${q.done}</td><td class="num">${q.failed}</td></tr>`,
        )}</tbody>
      </table>
      <h2>The last hour</h2>
      <p class="muted">Finished attempts per minute, from the attempt history (a moment behind the broker).</p>
      <div class="cards">${queues.map((q) => {
        const minutes = byQueue.get(q.queue) || [];
        const done = minutes.map((m) => ({ label: label(m), value: m.succeeded }));
        const rate = minutes.map((m) => {
          const n = m.succeeded + m.failed;
          return { label: label(m), value: n ? (100 * m.failed) / n : null };
        });
        return html`<section class="card" aria-labelledby="chart-${q.queue}">
          <h3 id="chart-${q.queue}"><a href="#/queues/${q.queue}">${q.queue}</a></h3>
          ${bars({ label: 'Throughput (succeeded / min)', points: done })}
          ${bars({ label: 'Failure rate (% of finished)', points: rate, max: 100, format: (v) => `${v.toFixed(0)} %`, className: 'failures' })}
        </section>`;
      })}</div>`;
  },
};

// ---- a queue's jobs ------------------------------------------------------------------------

function queuePage(queue, params) {
  const state = STATES.includes(params.get('state')) ? params.get('state') : '';
  const page = Math.max(0, parseInt(params.get('page') || '0', 10) || 0);
  const link = (s, p = 0) => `#/queues/${encodeURIComponent(queue)}?${new URLSearchParams({ ...(s ? { state: s } : {}), ...(p ? { page: p } : {}) })}`;
  return {
    title: `Queue ${queue}`,
    async load() {
      const q = encodeURIComponent(queue);
      const [stats, list] = await Promise.all([
        get(`/v1/queues/${q}`),
        get(url(`/v1/queues/${q}/jobs`, { state, offset: page * PAGE, limit: PAGE })),
      ]);
      return { stats, list };
    },
    render({ stats, list }) {
      const pages = Math.max(1, Math.ceil(list.total / PAGE));
      return html`<h1>Queue <span class="mono">${queue}</span></h1>
        <p class="summary">${stats.depth} pending · ${stats.scheduled} scheduled · ${stats.running} running · ${stats.dead} dead</p>
        <nav aria-label="Job states" class="tabs"><ul>
          <li><a href="${link('')}" ${state === '' ? raw('aria-current="page"') : ''}>All</a></li>
          ${STATES.map((s) => html`<li><a href="${link(s)}" ${state === s ? raw('aria-current="page"') : ''}>${s}</a></li>`)}
        </ul></nav>
        <p class="muted">${list.total} job(s)${state ? ` ${state}` : ''} in the history database; page ${page + 1} of ${pages}.</p>
        ${jobTable(list.jobs, { queue: false, empty: state ? `No ${state} jobs.` : 'No jobs yet.' })}
        <nav aria-label="Pages" class="pager">
          ${page > 0 ? html`<a href="${link(state, page - 1)}" rel="prev">← Newer</a>` : ''}
          ${page + 1 < pages ? html`<a href="${link(state, page + 1)}" rel="next">Older →</a>` : ''}
        </nav>`;
    },
  };
}

// ---- one job -------------------------------------------------------------------------------

function jobPage(id) {
  return {
    title: 'Job',
    load: () => get(`/v1/jobs/${encodeURIComponent(id)}`),
    render(j) {
      const dead = j.status === 'dead';
      const waiting = j.status === 'pending' || j.status === 'scheduled';
      return html`<h1>Job <span class="mono">${j.id}</span></h1>
        <p class="summary" id="job-summary">${status(j.status)}
          ${j.kind} on <a href="#/queues/${j.queue}">${j.queue}</a> · attempt ${j.attempts} of ${j.max_attempts}</p>
        <div class="actions">
          <button type="button" id="job-retry" data-action="retry" ${dead ? '' : raw('disabled')}>Retry</button>
          <button type="button" id="job-cancel" data-action="cancel" ${waiting ? '' : raw('disabled')}>Cancel</button>
          <button type="button" id="job-discard" data-action="discard" class="danger" ${dead ? '' : raw('disabled')}>Discard</button>
        </div>
        <dl class="facts">
          <dt>Kind</dt><dd>${j.kind}</dd>
          <dt>Queue</dt><dd>${j.queue}</dd>
          <dt>Priority</dt><dd>${j.priority}</dd>
          <dt>Enqueued</dt><dd>${when(j.created_at)}</dd>
          <dt>Due</dt><dd>${when(j.run_at)}</dd>
          <dt>Started</dt><dd>${when(j.started_at)}</dd>
          <dt>Finished</dt><dd>${when(j.finished_at)}</dd>
          <dt>Worker</dt><dd class="mono">${j.worker_id || '—'}</dd>
          <dt>Trace id</dt><dd class="mono">${traceId(j.trace_id)}</dd>
          <dt>Answered by</dt><dd>${j.source === 'broker' ? 'the broker (current)' : 'the history database'}</dd>
        </dl>
        ${j.last_error
          ? html`<h2>${j.status === 'succeeded' ? 'Error of the last failed attempt' : 'Last error'}</h2>
              <pre class="error" id="last-error">${j.last_error}</pre>`
          : ''}
        <h2>Payload</h2>
        <pre>${j.payload === undefined ? '—' : JSON.stringify(j.payload, null, 2)}</pre>
        <h2>Attempts</h2>
        ${j.attempt_history.length
          ? html`<table class="attempts"><thead><tr><th scope="col" class="num">#</th><th scope="col">Outcome</th>
              <th scope="col">Started</th><th scope="col">Took</th><th scope="col">Worker</th><th scope="col">Error</th></tr></thead>
              <tbody>${j.attempt_history.map(
                (a) => html`<tr><td class="num">${a.attempt}</td><td>${status(a.outcome || 'running')}</td>
                  <td>${when(a.started_at)}</td><td>${duration(a.started_at, a.finished_at)}</td>
                  <td class="mono">${a.worker_id || '—'}</td><td class="error">${a.error || ''}</td></tr>`,
              )}</tbody></table>`
          : html`<p class="empty">No attempt recorded yet.</p>`}`;
    },
    actions: {
      retry: () => act('Retry', async () => (await post(`/v1/jobs/${id}/retry`), 'Retried: the job is back in its queue.')),
      cancel: () => act('Cancel', async () => (await del(`/v1/jobs/${id}`), 'Canceled.')),
      discard: () => {
        if (!confirm('Discard this dead job for good? Its history stays.')) return;
        act('Discard', async () => (await del(`/v1/jobs/${id}`), 'Discarded from the dead set.'));
      },
    },
  };
}

// A W3C traceparent `00-<trace id>-<span id>-<flags>`: the trace id is what tracing UIs search.
function traceId(tp) {
  if (!tp) return '—';
  const parts = tp.split('-');
  return parts.length === 4 ? parts[1] : tp;
}

// ---- the dead set --------------------------------------------------------------------------

const selected = new Set();

const deadSet = {
  title: 'Dead set',
  async load() {
    const { queues } = await get('/v1/queues');
    const withDead = queues.filter((q) => q.dead > 0);
    const lists = await Promise.all(
      withDead.map((q) => get(url(`/v1/queues/${encodeURIComponent(q.queue)}/dead`, { limit: 100 }))),
    );
    const present = new Set(lists.flatMap((l) => l.jobs.map((j) => j.id)));
    for (const id of [...selected]) if (!present.has(id)) selected.delete(id);
    return withDead.map((q, i) => ({ queue: q.queue, dead: q.dead, jobs: lists[i].jobs }));
  },
  render(queues) {
    if (!queues.length) return html`<h1>Dead set</h1><p class="empty" id="dead-empty">No dead jobs in any queue.</p>`;
    return html`<h1>Dead set</h1>
      <p class="muted">Jobs that failed for the last time. Retrying gives a job a fresh attempt budget; discarding removes
        it from its queue for good (its history stays).</p>
      <div class="actions">
        <button type="button" id="dead-retry-selected" data-action="retrySelected" ${selected.size ? '' : raw('disabled')}>Retry selected (${selected.size})</button>
        <button type="button" id="dead-discard-selected" data-action="discardSelected" class="danger" ${selected.size ? '' : raw('disabled')}>Discard selected (${selected.size})</button>
      </div>
      ${queues.map(
        (q) => html`<section aria-labelledby="dead-${q.queue}">
          <h2 id="dead-${q.queue}">${q.queue} <span class="muted">(${q.dead} dead)</span></h2>
          <div class="actions">
            <button type="button" id="retry-all-${q.queue}" data-action="retryAll" data-queue="${q.queue}">Retry all ${q.dead}</button>
            <button type="button" id="discard-all-${q.queue}" data-action="discardAll" data-queue="${q.queue}" class="danger">Discard all ${q.dead}</button>
          </div>
          <table class="dead">
            <thead><tr><th scope="col"><span class="sr-only">Select</span></th><th scope="col">Job</th><th scope="col">Kind</th>
              <th scope="col" class="num">Attempts</th><th scope="col">Died</th><th scope="col">Last error</th></tr></thead>
            <tbody>${q.jobs.map(
              (j) => html`<tr data-job="${j.id}">
                <td><input type="checkbox" id="sel-${j.id}" data-select="${j.id}" ${selected.has(j.id) ? raw('checked') : ''}
                  aria-label="Select job ${j.id}"></td>
                <td>${jobLink(j.id)}</td><td>${j.kind}</td><td class="num">${j.attempts}/${j.max_attempts}</td>
                <td>${when(j.finished_at)}</td><td class="error">${short(j.last_error)}</td></tr>`,
            )}</tbody>
          </table>
          ${q.dead > q.jobs.length ? html`<p class="muted">Showing the newest ${q.jobs.length}.</p>` : ''}
        </section>`,
      )}`;
  },
  onSelect(box) {
    if (box.checked) selected.add(box.dataset.select);
    else selected.delete(box.dataset.select);
    lastHtml = '';
    refresh(generation);
  },
  actions: {
    retryAll: ({ queue }) =>
      act('Retry', async () => `Retried ${(await post(`/v1/queues/${encodeURIComponent(queue)}/dead/retry`)).jobs} job(s) of ${queue}.`),
    discardAll: ({ queue }) => {
      if (!confirm(`Discard every dead job of ${queue} for good?`)) return;
      act('Discard', async () => `Discarded ${(await del(`/v1/queues/${encodeURIComponent(queue)}/dead`)).jobs} job(s) of ${queue}.`);
    },
    retrySelected: () => bulk('Retry', (id) => post(`/v1/jobs/${id}/retry`)),
    discardSelected: () => {
      if (!confirm(`Discard ${selected.size} dead job(s) for good?`)) return;
      bulk('Discard', (id) => del(`/v1/jobs/${id}`));
    },
  },
};

function bulk(label, one) {
  const ids = [...selected];
  return act(label, async () => {
    const results = await Promise.allSettled(ids.map(one));
    const auth = results.find((r) => r.status === 'rejected' && r.reason instanceof AuthError);
    if (auth) throw auth.reason;
    ids.forEach((id) => selected.delete(id));
    const failed = results.filter((r) => r.status === 'rejected');
    return failed.length
      ? `${label}: ${ids.length - failed.length} done, ${failed.length} failed (${failed[0].reason.message})`
      : `${label}: ${ids.length} job(s) done.`;
  });
}

// ---- search --------------------------------------------------------------------------------

function searchPage(q) {
  return {
    title: 'Search',
    // Not polled: a reload would replace the form while the operator types in it.
    live: false,
    load: async () => (q ? get(url('/v1/jobs', { q, limit: 50 })) : null),
    render(results) {
      return html`<h1>Search jobs</h1>
        <form data-form="search" role="search" class="search">
          <label for="search-q">Job id, kind, payload text or error text</label>
          <input id="search-q" name="q" type="search" value="${q}" required maxlength="200">
          <button type="submit">Search</button>
        </form>
        ${results
          ? html`<p class="muted" id="search-count">${results.jobs.length} job(s) found for “${results.q}”${results.jobs.length === 50 ? ' (the newest 50)' : ''}.</p>
              ${jobTable(results.jobs, { empty: 'Nothing matches.' })}`
          : ''}`;
    },
    forms: {
      search: (data) => {
        const text = String(data.get('q') || '').trim();
        if (text) go(`#/search?${new URLSearchParams({ q: text })}`);
      },
    },
  };
}

// ---- schedules -----------------------------------------------------------------------------

const schedulesPage = {
  title: 'Schedules',
  load: () => get('/v1/schedules'),
  render({ schedules }) {
    if (!schedules.length) return html`<h1>Schedules</h1><p class="empty">No schedules.</p>`;
    return html`<h1>Schedules</h1>
      <table>
        <thead><tr><th scope="col">Name</th><th scope="col">Cron</th><th scope="col">Job</th><th scope="col">Enabled</th>
          <th scope="col">Last fired</th><th scope="col">Next fire</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>${schedules.map(
          (s) => html`<tr>
            <th scope="row" class="mono">${s.name}</th>
            <td><code>${s.cron}</code> <span class="muted">${s.timezone}</span></td>
            <td>${s.job.kind}${s.job.queue ? html` <span class="muted">on ${s.job.queue}</span>` : ''}</td>
            <td>${s.enabled ? 'yes' : html`<span class="bad">no</span>`}</td>
            <td>${when(s.last_tick)}</td><td>${s.enabled ? when(s.next_tick) : '—'}</td>
            <td><button type="button" id="toggle-${s.name}" data-action="toggle" data-name="${s.name}" data-enabled="${s.enabled}">
              ${s.enabled ? 'Disable' : 'Enable'}<span class="sr-only"> ${s.name}</span></button></td></tr>`,
        )}</tbody>
      </table>`;
  },
  actions: {
    toggle: ({ name, enabled }) =>
      act('Schedule', async () => {
        const s = await put(`/v1/schedules/${encodeURIComponent(name)}/enabled`, { enabled: enabled !== 'true' });
        return s.enabled ? `${name} enabled; next fire ${when(s.next_tick)}.` : `${name} disabled.`;
      }),
  },
};

// ---- backups -------------------------------------------------------------------------------

const bytes = (n) => {
  if (n === undefined || n === null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
};

const backupsPage = {
  title: 'Backups',
  load: () => get('/v1/backups'),
  render({ backups }) {
    if (!backups.length) return html`<h1>Backups</h1><p class="empty">No backups yet.</p>`;
    return html`<h1>Backups</h1>
      <table>
        <thead><tr><th scope="col">Started</th><th scope="col">Source</th><th scope="col">Target</th><th scope="col">Status</th>
          <th scope="col" class="num">Size</th><th scope="col" class="num">Stored</th><th scope="col">Encrypted</th>
          <th scope="col">Verified</th><th scope="col">Id</th></tr></thead>
        <tbody>${backups.map(
          (b) => html`<tr><td>${when(b.started_at)}</td><td>${b.source}</td><td>${b.target}</td>
            <td>${status(b.status)}${b.error ? html` <span class="error">${short(b.error, 80)}</span>` : ''}</td>
            <td class="num">${bytes(b.source_bytes)}</td><td class="num">${bytes(b.stored_bytes)}</td>
            <td>${b.encrypted ? 'yes' : 'no'}</td><td>${when(b.verified_at)}</td><td class="mono">${b.id}</td></tr>`,
        )}</tbody>
      </table>`;
  },
};

// ---- workers -------------------------------------------------------------------------------

const workersPage = {
  title: 'Workers',
  load: () => get('/v1/workers'),
  render({ workers }) {
    if (!workers.length) return html`<h1>Workers</h1><p class="empty">No worker has sent a heartbeat in the last 30 s.</p>`;
    const now = Date.now();
    return html`<h1>Workers</h1>
      <p class="muted">Worker processes beat every 5 s; one silent for 30 s is gone.</p>
      <table>
        <thead><tr><th scope="col">Id</th><th scope="col">Host</th><th scope="col">Queues</th>
          <th scope="col" class="num">Concurrency</th><th scope="col">Started</th><th scope="col">Last heartbeat</th></tr></thead>
        <tbody>${workers.map(
          (w) => html`<tr><th scope="row" class="mono">${w.id}</th><td>${w.host}</td><td>${w.queues.join(', ')}</td>
            <td class="num">${w.concurrency}</td><td>${when(w.started_at)}</td>
            <td title="${when(w.last_heartbeat_at)}">${ago(w.last_heartbeat_at, now)}</td></tr>`,
        )}</tbody>
      </table>`;
  },
};

const notFound = {
  title: 'Not found',
  live: false,
  load: async () => null,
  render: () => html`<h1>Not found</h1><p>No such page. <a href="#/">Back to the queues.</a></p>`,
};

// ---- start ---------------------------------------------------------------------------------

if (session.key()) {
  showApp();
  show();
} else {
  showLogin('');
}
