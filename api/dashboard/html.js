// HTML from template literals with every interpolated value escaped, unless it is itself an
// `html` fragment: data from the API (payloads, error texts) can never become markup.

class Fragment {
  constructor(s) {
    this.s = s;
  }
  toString() {
    return this.s;
  }
}

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

export function escape(v) {
  return String(v).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function piece(v) {
  if (v instanceof Fragment) return v.s;
  if (Array.isArray(v)) return v.map(piece).join('');
  if (v === undefined || v === null || v === false) return '';
  return escape(v);
}

export function html(strings, ...values) {
  let out = strings[0];
  values.forEach((v, i) => {
    out += piece(v) + strings[i + 1];
  });
  return new Fragment(out);
}

export const raw = (s) => new Fragment(s);

export function when(d) {
  if (!d) return '—';
  const date = new Date(d);
  return date.toLocaleString(undefined, { hour12: false });
}

export function ago(d, now = Date.now()) {
  if (!d) return '—';
  const s = Math.max(0, Math.round((now - new Date(d).getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

export function duration(from, to) {
  if (!from || !to) return '—';
  const ms = new Date(to).getTime() - new Date(from).getTime();
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}
