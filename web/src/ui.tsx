// Shared pieces: formatting, the error box, tables that sort, filter and
// page, a uPlot chart, and the hook that loads data. Everything that comes
// from the API is rendered as text nodes by preact (never as markup).
import { cloneElement, ComponentChildren, createContext, VNode } from "preact";
import { useCallback, useContext, useEffect, useId, useMemo, useRef, useState } from "preact/hooks";
import uPlot from "uplot";
import { ApiError, Session } from "./api";

export const SessionCtx = createContext<Session | null>(null);
export const useSession = () => useContext(SessionCtx);

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${u[i]}`;
}

export function when(unix: number | null | undefined): string {
  if (!unix) return "—";
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

/** Parses `10G`, `512M`, `1T`, or plain bytes. */
export function parseSize(s: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)i?B?\s*$/i.exec(s);
  if (!m) return null;
  const mult: Record<string, number> = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };
  return Math.round(parseFloat(m[1]) * mult[m[2].toUpperCase()]);
}

export function navigate(to: string) {
  history.pushState(null, "", to);
  dispatchEvent(new PopStateEvent("popstate"));
}

export function Link(p: { href: string; children: ComponentChildren; class?: string }) {
  return (
    <a
      href={p.href}
      class={p.class}
      onClick={(e) => {
        if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
        e.preventDefault();
        navigate(p.href);
      }}
    >
      {p.children}
    </a>
  );
}

export function ErrorBox({ error }: { error: unknown }) {
  if (!error) return null;
  const msg = error instanceof Error ? error.message : String(error);
  const code = error instanceof ApiError ? ` (${error.status} ${error.code})` : "";
  return (
    <div class="error" role="alert">
      {msg}
      <span class="muted">{code}</span>
    </div>
  );
}

/** Loads `f()` now, again when `deps` change, and every `every` ms if given. */
export function useLoad<T>(f: () => Promise<T>, deps: unknown[], every?: number) {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [n, setN] = useState(0);
  const reload = useCallback(() => setN((x) => x + 1), []);
  useEffect(() => {
    let live = true;
    const go = () =>
      f().then(
        (d) => live && (setData(d), setError(null)),
        (e) => live && setError(e),
      );
    go();
    const t = every ? setInterval(go, every) : undefined;
    return () => {
      live = false;
      if (t) clearInterval(t);
    };
  }, [...deps, n]);
  return { data, error, reload };
}

/** Runs an action; its error is shown, its success reloads. */
export function useAction() {
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const run = async (f: () => Promise<unknown>, after?: () => void) => {
    setBusy(true);
    setError(null);
    try {
      await f();
      after?.();
      return true;
    } catch (e) {
      setError(e);
      return false;
    } finally {
      setBusy(false);
    }
  };
  return { error, busy, run, setError };
}

export interface Col<T> {
  key: string;
  label: string;
  value: (r: T) => string | number;
  render?: (r: T) => ComponentChildren;
  num?: boolean;
}

export function Table<T>(p: { rows: T[] | null; cols: Col<T>[]; label: string; pageSize?: number; empty?: string }) {
  const [filter, setFilter] = useState("");
  const [sort, setSort] = useState<{ key: string; desc: boolean } | null>(null);
  const [page, setPage] = useState(0);
  const size = p.pageSize ?? 50;
  const rows = useMemo(() => {
    let r = p.rows ?? [];
    const f = filter.trim().toLowerCase();
    if (f) r = r.filter((x) => p.cols.some((c) => String(c.value(x)).toLowerCase().includes(f)));
    if (sort) {
      const c = p.cols.find((c) => c.key === sort.key);
      if (c) {
        r = [...r].sort((a, b) => {
          const x = c.value(a);
          const y = c.value(b);
          const o = x < y ? -1 : x > y ? 1 : 0;
          return sort.desc ? -o : o;
        });
      }
    }
    return r;
  }, [p.rows, filter, sort]);
  const pages = Math.max(1, Math.ceil(rows.length / size));
  const pg = Math.min(page, pages - 1);
  const shown = rows.slice(pg * size, (pg + 1) * size);
  return (
    <div class="table">
      <div class="tools">
        <input
          type="search"
          placeholder="Filter"
          aria-label={`Filter ${p.label}`}
          value={filter}
          onInput={(e) => (setFilter((e.target as HTMLInputElement).value), setPage(0))}
        />
        <span class="muted">
          {rows.length} {rows.length === 1 ? "row" : "rows"}
        </span>
      </div>
      <div class="scroll">
        <table aria-label={p.label}>
          <thead>
            <tr>
              {p.cols.map((c) => (
                <th
                  key={c.key}
                  class={c.num ? "num" : ""}
                  aria-sort={sort?.key === c.key ? (sort.desc ? "descending" : "ascending") : undefined}
                >
                  <button
                    type="button"
                    class="sort"
                    onClick={() => setSort({ key: c.key, desc: sort?.key === c.key ? !sort.desc : false })}
                  >
                    {c.label}
                    {sort?.key === c.key ? (sort.desc ? " ▼" : " ▲") : ""}
                  </button>
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {p.rows === null ? (
              <tr>
                <td colSpan={p.cols.length}>Loading…</td>
              </tr>
            ) : shown.length === 0 ? (
              <tr>
                <td colSpan={p.cols.length} class="muted">
                  {p.empty ?? "Nothing here."}
                </td>
              </tr>
            ) : (
              shown.map((r, i) => (
                <tr key={i}>
                  {p.cols.map((c) => (
                    <td key={c.key} class={c.num ? "num" : ""} data-label={c.label}>
                      {c.render ? c.render(r) : c.value(r)}
                    </td>
                  ))}
                </tr>
              ))
            )}
          </tbody>
        </table>
      </div>
      {pages > 1 && (
        <nav class="pager" aria-label={`${p.label} pages`}>
          <button type="button" disabled={pg === 0} onClick={() => setPage(pg - 1)}>
            Previous
          </button>
          <span>
            Page {pg + 1} of {pages}
          </span>
          <button type="button" disabled={pg >= pages - 1} onClick={() => setPage(pg + 1)}>
            Next
          </button>
        </nav>
      )}
    </div>
  );
}

export function Chart(p: { title: string; data: uPlot.AlignedData; series: uPlot.Series[]; yFmt?: (v: number) => string; bars?: boolean; xIsTime?: boolean }) {
  const el = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  useEffect(() => {
    if (!el.current) return;
    const width = Math.max(240, Math.min(560, el.current.clientWidth || 480));
    const fmt = p.yFmt;
    const opts: uPlot.Options = {
      width,
      height: 180,
      series: [{}, ...p.series.map((s) => (p.bars ? { ...s, paths: uPlot.paths.bars!({ size: [0.6, 40] }) } : s))],
      axes: [{}, { size: 70, values: fmt ? (_u, vals) => vals.map((v) => fmt(v)) : undefined }],
      legend: { show: false },
      scales: { x: { time: p.xIsTime ?? true } },
    };
    plot.current?.destroy();
    plot.current = new uPlot(opts, p.data, el.current);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
  }, [p.data]);
  return (
    <figure class="chart">
      <figcaption>{p.title}</figcaption>
      <div ref={el} role="img" aria-label={p.title} />
    </figure>
  );
}

/** A confirmation step inside the page (no window.confirm, so tests and
 * keyboards see the same thing). */
export function Confirm(p: { label: string; danger?: boolean; onConfirm: () => void; disabled?: boolean }) {
  const [ask, setAsk] = useState(false);
  if (!ask)
    return (
      <button type="button" class={p.danger ? "danger" : ""} disabled={p.disabled} onClick={() => setAsk(true)}>
        {p.label}
      </button>
    );
  return (
    <span class="confirm">
      <button
        type="button"
        class="danger"
        onClick={() => {
          setAsk(false);
          p.onConfirm();
        }}
      >
        Confirm {p.label.toLowerCase()}
      </button>
      <button type="button" onClick={() => setAsk(false)}>
        Cancel
      </button>
    </span>
  );
}

/** A labelled control: the label names the control by `for`, so its name
 * is the label alone (a wrapping label would add a select's options). */
export function Field(p: { label: string; children: VNode<{ id?: string }> }) {
  const id = useId();
  return (
    <span class="field">
      <label for={id}>{p.label}</label>
      {cloneElement(p.children, { id })}
    </span>
  );
}

export const val = (e: Event) => (e.target as HTMLInputElement).value;
