// The API client: every call carries the operator's key as a bearer token, from this tab's
// session storage (never a URL, never local storage). 401/403 become an AuthError, which sends
// the operator back to the login form with the API's reason.

const KEY = 'drover.key';

export class AuthError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export class ApiError extends Error {
  constructor(message, status, problem) {
    super(message);
    this.status = status;
    this.problem = problem;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export async function call(method, path, body, key = session.key()) {
  const headers = { Accept: 'application/json, application/problem+json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`the API did not answer (${e.message})`, 0, null);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  const detail = (data && (data.detail || data.title)) || `${resp.status} ${resp.statusText}`;
  if (resp.status === 401 || resp.status === 403) throw new AuthError(detail, resp.status);
  if (!resp.ok) throw new ApiError(detail, resp.status, data);
  return data;
}

export const get = (path) => call('GET', path);
export const post = (path, body) => call('POST', path, body);
export const put = (path, body) => call('PUT', path, body);
export const del = (path) => call('DELETE', path);

// `/v1/…?a=1&b=2` with the absent parameters left out.
export function url(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}
