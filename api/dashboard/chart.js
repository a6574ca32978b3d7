// Small bar charts drawn as SVG: one bar per minute, the newest on the right. Each chart is an
// image with a text summary for screen readers, and a <title> per bar for pointer users.

import { html, raw, escape } from './html.js';

const W = 300;
const H = 64;

export function bars({ label, points, format = (v) => String(v), max, className = '' }) {
  const peak = max ?? Math.max(1, ...points.map((p) => p.value ?? 0));
  const n = Math.max(1, points.length);
  const slot = W / n;
  const width = Math.max(1, slot - 1);
  const rects = points
    .map((p, i) => {
      if (p.value === null || p.value === undefined) return '';
      const h = p.value === 0 ? 0 : Math.max(1, (p.value / peak) * (H - 2));
      const x = (i * slot).toFixed(2);
      const y = (H - h).toFixed(2);
      const tip = `${p.label}: ${format(p.value)}`;
      return `<rect x="${x}" y="${y}" width="${width.toFixed(2)}" height="${h.toFixed(2)}"><title>${escape(tip)}</title></rect>`;
    })
    .join('');
  const values = points.map((p) => p.value).filter((v) => v !== null && v !== undefined);
  const last = values.length ? values[values.length - 1] : null;
  const top = values.length ? Math.max(...values) : null;
  const summary =
    last === null ? `${label}: no finished attempts in the window` : `${label}: latest minute ${format(last)}, peak ${format(top)}`;
  return html`<figure class="chart ${className}">
    <figcaption>${label} <span class="muted">(now ${last === null ? '—' : format(last)}, peak ${top === null ? '—' : format(top)})</span></figcaption>
    <svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${summary}">
      <line x1="0" y1="${H - 0.5}" x2="${W}" y2="${H - 0.5}" class="axis"></line>${raw(rects)}
    </svg>
  </figure>`;
}
