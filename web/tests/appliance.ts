// A real snapshotd for the browser tests: started from target/debug with a
// fresh data directory, an NBD unix socket and instant mounts; users are
// made through the API with the admin token it writes.
import { test as base, expect, Page } from "@playwright/test";
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const BIN = join(ROOT, "target/debug");

export interface Appliance {
  url: string;
  dir: string;
  sock: string;
  admin: string;
  api<T = unknown>(method: string, path: string, body?: unknown, token?: string): Promise<T>;
  /** Writes a local image file into a volume over NBD (nbdcopy on the unix socket). */
  nbdWrite(volume: string, image: string): void;
  log(): string;
}

function sh(cmd: string, args: string[], opts: { input?: string } = {}) {
  return execFileSync(cmd, args, { stdio: ["pipe", "pipe", "pipe"], input: opts.input }).toString();
}

async function waitFor<T>(what: string, f: () => T | undefined, child: ChildProcess, log: string): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (child.exitCode !== null) throw new Error(`${what}: snapshotd exited ${child.exitCode}:\n${readFileSync(log, "utf8")}`);
    if (Date.now() - t0 > 60_000) throw new Error(`${what}: not after 60 s:\n${readFileSync(log, "utf8")}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function startAppliance(extra: string[] = []): Promise<Appliance & { stop(): Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), "cdm-web-"));
  const data = join(dir, "data");
  const ready = join(dir, "ready.json");
  const sock = join(dir, "nbd.sock");
  const mnt = join(dir, "fuse");
  mkdirSync(mnt);
  const logFile = join(dir, "snapshotd.log");
  const out = openSync(logFile, "a");
  const child = spawn(
    join(BIN, "snapshotd"),
    ["--data", data, "--api", "127.0.0.1:0", "--ready-file", ready, "--nbd", `unix:${sock}`, "--pool-size", "4G", "--pool-sparse", "--mount", mnt, "--fake-clock", ...extra],
    { stdio: ["ignore", out, out], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" } },
  );
  const addr = await waitFor(
    "ready file",
    () => {
      if (!existsSync(ready)) return undefined;
      return JSON.parse(readFileSync(ready, "utf8")).api as string;
    },
    child,
    logFile,
  );
  const url = `http://${addr}`;
  const admin = readFileSync(join(data, "admin.token"), "utf8").trim();
  const api = async <T>(method: string, path: string, body?: unknown, token = admin): Promise<T> => {
    const r = await fetch(url + path, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  };
  return {
    url,
    dir,
    sock,
    admin,
    api,
    nbdWrite(volume, image) {
      sh("nbdcopy", ["--", image, `nbd+unix:///${volume}?socket=${sock}`]);
    },
    log: () => readFileSync(logFile, "utf8"),
    async stop() {
      // Mounts first, while snapshotd can still take them down cleanly.
      try {
        for (const m of await api<{ name: string }[]>("GET", "/v1/mounts")) await api("DELETE", `/v1/mounts/${m.name}`);
      } catch {
        // Best effort: the process is stopped below anyway.
      }
      child.kill("SIGTERM");
      await new Promise<void>((r) => (child.exitCode !== null ? r() : child.once("exit", () => r())));
      try {
        sh("umount", ["-l", mnt]);
      } catch {
        // Not mounted any more.
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export const PASSWORD = "correct horse battery staple";

/** Users every test can sign in as. */
export async function makeUsers(a: Appliance) {
  for (const [name, role, grants] of [
    ["alice", "admin", []],
    ["oscar", "operator", ["delete"]],
    ["audrey", "auditor", []],
  ] as const) {
    await a.api("POST", "/v1/users", { name, role, password: PASSWORD, grants });
  }
}

export const test = base.extend<{ app: Appliance; page: Page }, { appliance: Appliance }>({
  appliance: [
    async ({}, use) => {
      const a = await startAppliance();
      await makeUsers(a);
      await use(a);
      await a.stop();
    },
    { scope: "worker", timeout: 120_000 },
  ],
  app: async ({ appliance }, use) => use(appliance),
  page: async ({ page }, use) => {
    // Any script run from data (XSS) or any console error fails the test.
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("dialog", (d) => {
      errors.push(`dialog opened: ${d.message()}`);
      d.dismiss();
    });
    await use(page);
    expect(errors, "no page errors or dialogs").toEqual([]);
  },
});

export { expect };

export async function signIn(page: Page, app: Appliance, user = "alice", path = "/") {
  await page.goto(app.url + path);
  await page.getByLabel("User", { exact: true }).fill(user);
  await page.getByLabel("Password", { exact: true }).fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("who")).toContainText(user);
}

/** A scratch directory for images, removed by the caller. */
export function scratch(): string {
  return mkdtempSync(join(tmpdir(), "cdm-web-img-"));
}

export function run(cmd: string, args: string[]) {
  return sh(cmd, args);
}

export function write(path: string, data: string | Buffer) {
  writeFileSync(path, data);
}

export function screenshotPath(name: string) {
  const d = join(ROOT, "target/web-screenshots");
  mkdirSync(d, { recursive: true });
  return join(d, `${name}.png`);
}
