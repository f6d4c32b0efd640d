// The API client: every call carries the bearer token (never a cookie, so a
// page elsewhere cannot make the browser act for the user: CSRF), every
// error answer becomes an ApiError with the API's own message, and a 401
// ends the session and sends the user to sign-in with the page kept.
import type { components } from "./openapi";

export type S = components["schemas"];

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

export interface Session {
  token: string;
  user: string;
  role: string;
  grants: string[];
  expires: number | null;
}

const KEY = "cdm.session";

export function loadSession(): Session | null {
  try {
    const s = sessionStorage.getItem(KEY);
    if (!s) return null;
    const v = JSON.parse(s) as Session;
    if (v.expires && v.expires * 1000 <= Date.now()) {
      sessionStorage.removeItem(KEY);
      return null;
    }
    return v;
  } catch {
    return null;
  }
}

export function saveSession(s: Session | null) {
  if (s) sessionStorage.setItem(KEY, JSON.stringify(s));
  else sessionStorage.removeItem(KEY);
}

let onExpired: () => void = () => {};
export function setExpiredHandler(f: () => void) {
  onExpired = f;
}

async function errorOf(r: Response): Promise<ApiError> {
  const text = await r.text();
  try {
    const b = JSON.parse(text) as S["ErrorBody"];
    return new ApiError(r.status, b.error.code, b.error.message);
  } catch {
    return new ApiError(r.status, "http", `${r.status} ${r.statusText}${text ? ": " + text.slice(0, 200) : ""}`);
  }
}

export async function raw(method: string, path: string, body?: unknown): Promise<Response> {
  const s = loadSession();
  const headers: Record<string, string> = {};
  if (s) headers["Authorization"] = `Bearer ${s.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r: Response;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, "network", `the appliance did not answer: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (r.status === 401 && path !== "/v1/login") {
    saveSession(null);
    onExpired();
  }
  if (!r.ok) throw await errorOf(r);
  return r;
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const r = await raw(method, path, body);
  if (r.status === 204) return undefined as T;
  return (await r.json()) as T;
}

export const get = <T>(path: string) => call<T>("GET", path);

/** Encodes one path segment. */
export const seg = encodeURIComponent;

/** Fetches `path` with the token and hands the bytes to the browser as a download. */
export async function download(path: string, name: string) {
  const r = await raw("GET", path);
  const blob = await r.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export async function login(name: string, password: string): Promise<Session> {
  const t = await call<S["TokenCreated"]>("POST", "/v1/login", { name, password });
  // The role decides which buttons are shown; the API enforces it anyway.
  const s: Session = { token: t.token, user: t.user, role: "auditor", grants: [], expires: t.expires_unix ?? null };
  saveSession(s);
  const u = await get<S["User"]>(`/v1/users/${seg(t.user)}`);
  s.role = u.role;
  s.grants = u.grants;
  saveSession(s);
  return s;
}

export function may(s: Session | null, what: "write" | "delete" | "admin" | "audit"): boolean {
  if (!s) return false;
  if (s.role === "admin") return true;
  if (what === "audit") return s.role === "auditor";
  if (s.role !== "operator") return false;
  if (what === "write") return true;
  if (what === "delete") return s.grants.includes("delete");
  return false;
}
