// End-to-end flows of the web console in headless Chromium against a real
// snapshotd: each drives the pages as a person would and checks what the
// API and the disks then hold.
import AxeBuilder from "@axe-core/playwright";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Appliance, expect, Page, PASSWORD, scratch, screenshotPath, signIn, test } from "./appliance";
import { ext4, ntfs, xfs } from "./images";

// No quotes: JSON shows it unchanged, so the same text is looked for
// everywhere (labels, metadata, events, file names).
const HOSTILE = "<img src=x onerror=window.__xss=1>";

async function noXss(page: Page) {
  expect(await page.evaluate(() => (window as unknown as { __xss?: number }).__xss)).toBeUndefined();
  expect(await page.locator("img[src=x]").count()).toBe(0);
}

async function createVolume(page: Page, name: string, size = "512M") {
  await page.getByRole("link", { name: "Volumes", exact: true }).click();
  const form = page.getByRole("form", { name: "Create a volume" });
  await form.getByLabel("Name", { exact: true }).fill(name);
  await form.getByLabel("Size", { exact: true }).fill(size);
  await form.getByRole("button", { name: "Create volume" }).click();
  await expect(page.getByRole("link", { name, exact: true })).toBeVisible();
}

async function snapshot(page: Page, volume: string, label: string, metadata?: string): Promise<number> {
  await page.goto(`${new URL(page.url()).origin}/volumes/${volume}`);
  const form = page.getByRole("form", { name: "Create a snapshot" });
  await form.getByLabel("Label", { exact: true }).fill(label);
  if (metadata) await form.getByLabel("Metadata (JSON object)", { exact: true }).fill(metadata);
  await form.getByRole("button", { name: "Take snapshot" }).click();
  const row = page.getByRole("row").filter({ hasText: label });
  await expect(row).toBeVisible();
  return Number(await row.getByRole("cell").first().innerText());
}

/** A volume holding `img`, written over NBD, and a snapshot of it. */
async function pointOf(page: Page, app: Appliance, name: string, img: string, size: string): Promise<number> {
  await createVolume(page, name, size);
  app.nbdWrite(name, img);
  return snapshot(page, name, `${name}-point`);
}

async function browseAndDownload(page: Page, app: Appliance, volume: string, id: number, from: string, dir: string, file: string, want: Buffer) {
  await page.goto(`${app.url}/browse/${volume}/${id}?path=${encodeURIComponent(from)}`);
  await page.getByRole("button", { name: `${dir}/` }).click();
  await expect(page.getByRole("cell", { name: file, exact: true })).toBeVisible();
  const dl = page.waitForEvent("download");
  await page.getByRole("button", { name: `Download ${file}`, exact: true }).click();
  const d = await dl;
  expect(d.suggestedFilename()).toBe(file);
  expect(readFileSync(await d.path())).toEqual(want);
}

test("sign in: a wrong password shows the API's message, an ended session keeps the page", async ({ page, app }) => {
  await page.goto(app.url + "/volumes");
  await page.getByLabel("User", { exact: true }).fill("alice");
  await page.getByLabel("Password", { exact: true }).fill("wrong");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("alert")).toContainText(/password|credentials|user/i);
  await page.getByLabel("Password", { exact: true }).fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("heading", { name: "Volumes" })).toBeVisible();
  // The token lives in sessionStorage, never in a cookie.
  expect(await page.context().cookies()).toEqual([]);
  const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem("cdm.session") ?? "{}").token as string);
  expect(token).toBeTruthy();
  // The session ends behind the page's back (logged out elsewhere).
  await app.api("POST", "/v1/logout", undefined, token);
  await page.getByRole("link", { name: "Clones", exact: true }).click();
  await expect(page.getByText("Your session ended")).toBeVisible();
  expect(new URL(page.url()).pathname).toBe("/clones");
  await page.getByLabel("User", { exact: true }).fill("alice");
  await page.getByLabel("Password", { exact: true }).fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("heading", { name: "Clones" })).toBeVisible();
});

test("create a volume with the data pipeline; a duplicate name shows the API's error", async ({ page, app }) => {
  await signIn(page, app);
  await page.getByRole("link", { name: "Volumes", exact: true }).click();
  const form = page.getByRole("form", { name: "Create a volume" });
  await form.getByLabel("Name", { exact: true }).fill("pipeline");
  await form.getByLabel("Size", { exact: true }).fill("1G");
  await form.getByLabel("Block size", { exact: true }).selectOption("16384");
  await form.getByLabel("Compression (zstd level, 0 = off)", { exact: true }).fill("3");
  await form.getByLabel("Deduplication", { exact: true }).check();
  await form.getByRole("button", { name: "Create volume" }).click();
  await expect(page.getByRole("link", { name: "pipeline", exact: true })).toBeVisible();
  const v = await app.api<{ size: number; block_size: number; dedup: boolean; compression: number }>("GET", "/v1/volumes/pipeline");
  expect(v).toMatchObject({ size: 1 << 30, block_size: 16384, dedup: true, compression: 3 });
  await form.getByLabel("Name", { exact: true }).fill("pipeline");
  await form.getByRole("button", { name: "Create volume" }).click();
  await expect(form.getByRole("alert")).toContainText("pipeline");
  await expect(form.getByRole("alert")).toContainText("409");
  // Grow it from its page.
  await page.getByRole("link", { name: "pipeline", exact: true }).click();
  await page.getByLabel("New size", { exact: true }).fill("2G");
  await page.getByRole("button", { name: "Grow" }).click();
  await expect(page.getByText("2.0 GiB").first()).toBeVisible();
});

test("write over NBD, snapshot, clone, copy its NBD URI, promote, delete", async ({ page, app }) => {
  const dir = scratch();
  try {
    await signIn(page, app);
    const data = randomBytes(1 << 20);
    const img = join(dir, "raw.img");
    // A plain file of bytes is a disk image too (no filesystem).
    writeFileSync(img, data);
    const id = await pointOf(page, app, "written", img, "64M");
    const snap = await app.api<{ allocated_bytes: number }>("GET", `/v1/volumes/written/snapshots/${id}`);
    expect(snap.allocated_bytes).toBeGreaterThanOrEqual(1 << 20);
    const row = page.getByRole("row").filter({ hasText: "written-point" });
    for (const name of ["written-copy", "written-scratch"]) {
      await row.getByRole("button", { name: "Clone" }).click();
      await page.getByLabel(`Clone name (of snapshot ${id})`, { exact: true }).fill(name);
      await page.getByRole("button", { name: "Create clone" }).click();
      await expect(row).toContainText(name);
    }
    await page.getByRole("link", { name: "Clones", exact: true }).click();
    const crow = (name: string) => page.getByRole("table", { name: "Clones" }).getByRole("row").filter({ hasText: name });
    await expect(crow("written-copy")).toContainText(`written@${id}`);
    await expect(crow("written-copy")).toContainText(`nbd+unix:///written-copy?socket=${app.sock}`);
    // Promoted, a clone is a volume of its own: it leaves the clones page.
    await crow("written-copy").getByRole("button", { name: "Promote" }).click();
    await expect(crow("written-copy")).toHaveCount(0);
    await crow("written-scratch").getByRole("button", { name: "Delete" }).click();
    await crow("written-scratch").getByRole("button", { name: "Confirm delete" }).click();
    await expect(crow("written-scratch")).toHaveCount(0);
    expect((await app.api<{ name: string }[]>("GET", "/v1/clones")).map((c) => c.name)).toEqual([]);
    await page.getByRole("link", { name: "Volumes", exact: true }).click();
    await expect(page.getByRole("row").filter({ hasText: "written-copy" })).toContainText("stage");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("mount a point read-only, browse it, download a file and a folder", async ({ page, app }) => {
  const dir = scratch();
  try {
    await signIn(page, app);
    const report = randomBytes(300_000);
    const img = ext4(dir, { "docs/report.bin": report, "docs/notes.txt": "hello\n", [`docs/${HOSTILE}`]: "x" });
    const id = await pointOf(page, app, "ext4vol", img, "128M");
    // Mount from the snapshot's row.
    const row = page.getByRole("row").filter({ hasText: "ext4vol-point" });
    await row.getByRole("link", { name: "Mount", exact: true }).click();
    await expect(page.getByLabel("Snapshot (VOLUME@ID)", { exact: true })).toHaveValue(`ext4vol@${id}`);
    await page.getByRole("button", { name: "Mount", exact: true }).click();
    const path = await page.getByTestId("mount-path").innerText();
    expect(readFileSync(join(path, "docs/report.bin"))).toEqual(report);
    await expect(page.getByRole("row").filter({ hasText: `ext4vol@${id}` })).toContainText("read-only");
    // The file browser reads the point without the mount.
    await browseAndDownload(page, app, "ext4vol", id, "/", "docs", "report.bin", report);
    await expect(page.getByRole("cell", { name: HOSTILE, exact: true })).toBeVisible();
    await noXss(page);
    const tar = page.waitForEvent("download");
    await page.getByRole("button", { name: "Download this folder as tar" }).click();
    const t = await tar;
    expect(readFileSync(await t.path()).toString("latin1")).toContain("report.bin");
    // Unmount.
    await page.getByRole("link", { name: "Mounts", exact: true }).click();
    const mrow = page.getByRole("row").filter({ hasText: `ext4vol@${id}` });
    await mrow.getByRole("button", { name: "Unmount" }).click();
    await mrow.getByRole("button", { name: "Confirm unmount" }).click();
    await expect(page.getByRole("row").filter({ hasText: `ext4vol@${id}` })).toHaveCount(0);
    expect(existsSync(join(path, "docs/report.bin"))).toBe(false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Mounts `volume@id` read-only from its snapshot row; returns the path. */
async function mountFromConsole(page: Page, volume: string, id: number): Promise<string> {
  await page.goto(`${new URL(page.url()).origin}/volumes/${volume}`);
  await page.getByRole("row").filter({ hasText: `${volume}-point` }).getByRole("link", { name: "Mount" }).click();
  await expect(page.getByLabel("Snapshot (VOLUME@ID)", { exact: true })).toHaveValue(`${volume}@${id}`);
  await page.getByRole("button", { name: "Mount", exact: true }).click();
  return page.getByTestId("mount-path").innerText();
}

async function unmount(page: Page, volume: string, id: number) {
  await page.getByRole("link", { name: "Mounts", exact: true }).click();
  const r = page.getByRole("row").filter({ hasText: `${volume}@${id}` });
  await r.getByRole("button", { name: "Unmount" }).click();
  await r.getByRole("button", { name: "Confirm unmount" }).click();
  await expect(page.getByRole("row").filter({ hasText: `${volume}@${id}` })).toHaveCount(0);
}

// The files routes read XFS and NTFS too (cdm_inspect::browse): the file
// browser lists the point, downloads a file (bytes compared) and the
// folder as a tar; an instant mount from the console holds the same files.
for (const [fs, make, size, from, folder, name] of [
  ["XFS", xfs, "512M", "/", "data", "table.dat"],
  ["NTFS", ntfs, "64M", "/Users", "Public", "ledger.xlsx"],
] as const) {
  test(`an ${fs} point: browse it, download a file and a folder, mount it read-only`, async ({ page, app }) => {
    const dir = scratch();
    const vol = fs.toLowerCase() + "vol";
    const file = `${from.slice(1)}${from === "/" ? "" : "/"}${folder}/${name}`;
    try {
      await signIn(page, app);
      const data = randomBytes(150_000);
      const img = make(dir, { [file]: data, "etc/readme.txt": "hello\n" });
      const id = await pointOf(page, app, vol, img, size);
      await browseAndDownload(page, app, vol, id, from, folder, name, data);
      const tar = page.waitForEvent("download");
      await page.getByRole("button", { name: "Download this folder as tar" }).click();
      const t = await tar;
      expect(t.suggestedFilename()).toBe(`${vol}-${id}-${folder}.tar`);
      expect(readFileSync(await t.path()).toString("latin1")).toContain(name);
      const path = await mountFromConsole(page, vol, id);
      await expect(page.getByRole("row").filter({ hasText: `${vol}@${id}` })).toContainText(fs === "XFS" ? "xfs" : "ntfs");
      expect(readFileSync(join(path, file))).toEqual(data);
      await unmount(page, vol, id);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("a failing job shows up on the dashboard, with its log", async ({ page, app }) => {
  await signIn(page, app);
  await page.getByRole("link", { name: "Jobs", exact: true }).click();
  const form = page.getByRole("form", { name: "Start a job" });
  await form.getByLabel("Kind", { exact: true }).selectOption("vm-backup");
  await form.getByLabel("Inventory on the appliance", { exact: true }).fill("/nonexistent/inventory.toml");
  await form.getByLabel("Category", { exact: true }).fill("os:linux");
  await form.getByRole("button", { name: "Start job" }).click();
  await page.getByRole("link", { name: "Dashboard", exact: true }).click();
  const failed = page.getByRole("table", { name: "Failed jobs" });
  await expect(failed.getByRole("row").filter({ hasText: "vm-backup" })).toBeVisible({ timeout: 60_000 });
  await expect(page.getByTestId("failed-count")).not.toHaveText("0");
  await failed.getByRole("row").filter({ hasText: "vm-backup" }).getByRole("link").click();
  await expect(page.getByTestId("job-state")).toHaveText("failed");
  await expect(page.getByTestId("job-log")).toContainText(/nonexistent|inventory/);
});

test("an auditor sees read-only pages", async ({ page, app }) => {
  await app.api("POST", "/v1/volumes", { name: "audited", size: 1 << 26 });
  await app.api("POST", "/v1/volumes/audited/snapshots", { label: "seen" });
  await signIn(page, app, "audrey");
  await expect(page.getByTestId("who")).toContainText("auditor");
  await page.getByRole("link", { name: "Volumes", exact: true }).click();
  await expect(page.getByRole("link", { name: "audited", exact: true })).toBeVisible();
  await expect(page.getByRole("form", { name: "Create a volume" })).toHaveCount(0);
  await page.getByRole("link", { name: "audited", exact: true }).click();
  await expect(page.getByRole("row").filter({ hasText: "seen" })).toBeVisible();
  for (const b of ["Delete volume", "Grow", "Take snapshot", "Clone", "Delete", "Edit policy"]) {
    await expect(page.getByRole("button", { name: b, exact: true })).toHaveCount(0);
  }
  await expect(page.getByRole("link", { name: "Browse files", exact: true })).toBeVisible();
  for (const [link, form] of [
    ["Jobs", "Start a job"],
    ["Mounts", "Mount a snapshot"],
    ["Webhooks", "Create a webhook"],
  ]) {
    await page.getByRole("link", { name: link, exact: true }).click();
    await expect(page.getByRole("heading", { level: 1 })).toBeVisible();
    await expect(page.getByRole("form", { name: form })).toHaveCount(0);
  }
  await page.getByRole("link", { name: "Audit", exact: true }).click();
  await expect(page.getByRole("table", { name: "Audit log" })).toContainText("/v1/volumes/audited/snapshots");
  await page.getByRole("link", { name: "Users and tokens", exact: true }).click();
  await expect(page.getByRole("form", { name: "Create a user" })).toHaveCount(0);
  await expect(page.getByRole("heading", { name: "Tokens of audrey" })).toBeVisible();
});

test("hostile labels, metadata and event texts are shown as text", async ({ page, app }) => {
  await signIn(page, app);
  await createVolume(page, "hostile", "64M");
  await snapshot(page, "hostile", HOSTILE, JSON.stringify({ note: HOSTILE, "<b>key</b>": "<script>window.__xss=2</script>" }));
  await expect(page.getByRole("cell", { name: HOSTILE, exact: true })).toBeVisible();
  await expect(page.getByText("<script>window.__xss=2</script>", { exact: false })).toBeVisible();
  await noXss(page);
  await page.getByRole("link", { name: "Events", exact: true }).click();
  await expect(page.getByRole("table", { name: "Events" })).toContainText(HOSTILE);
  await noXss(page);
  await page.getByRole("link", { name: "Dashboard", exact: true }).click();
  await noXss(page);
});

test("deleting a volume shows the API's safety answer, force deletes it everywhere", async ({ page, app }) => {
  await signIn(page, app);
  await createVolume(page, "doomed", "64M");
  await snapshot(page, "doomed", "keep-me");
  await page.getByRole("button", { name: "Delete volume" }).click();
  await page.getByRole("button", { name: "Confirm delete volume" }).click();
  await expect(page.getByRole("alert")).toContainText("snapshot");
  await page.getByRole("button", { name: "Delete anyway (force)" }).click();
  await page.getByRole("button", { name: "Confirm delete anyway (force)" }).click();
  await expect(page.getByText("Volume doomed was deleted.")).toBeVisible();
  await page.getByRole("link", { name: "Volumes", exact: true }).click();
  await expect(page.getByRole("table", { name: "Volumes" })).not.toContainText("doomed");
  await page.getByRole("link", { name: "Mounts", exact: true }).click();
  await page.getByRole("link", { name: "Clones", exact: true }).click();
  await expect(page.getByRole("table", { name: "Clones" })).not.toContainText("doomed");
});

test("users and tokens: a new token is shown once and works", async ({ page, app }) => {
  await signIn(page, app);
  await page.getByRole("link", { name: "Users and tokens", exact: true }).click();
  const form = page.getByRole("form", { name: "Create a user" });
  await form.getByLabel("User name", { exact: true }).fill("webop");
  await form.getByLabel("Role", { exact: true }).selectOption("operator");
  await form.getByLabel("Password", { exact: true }).fill("another long password");
  await form.getByRole("button", { name: "Create user" }).click();
  const row = page.getByRole("row").filter({ hasText: "webop" });
  await expect(row).toContainText("operator");
  await row.getByRole("button", { name: "Tokens" }).click();
  const tform = page.getByRole("form", { name: "Create a token" });
  await tform.getByLabel("Token name", { exact: true }).fill("ci");
  await tform.getByRole("button", { name: "Create token" }).click();
  const token = await page.getByTestId("new-token").innerText();
  const me = await app.api<{ name: string }>("GET", "/v1/users/webop", undefined, token);
  expect(me.name).toBe("webop");
  await page.getByRole("button", { name: "Done" }).click();
  await expect(page.getByTestId("new-token")).toHaveCount(0);
  await expect(page.getByText(token)).toHaveCount(0);
  const trow = page.getByRole("table", { name: "Tokens of webop" }).getByRole("row").filter({ hasText: "ci" });
  await trow.getByRole("button", { name: "Revoke" }).click();
  await trow.getByRole("button", { name: "Confirm revoke" }).click();
  await expect(page.getByRole("table", { name: "Tokens of webop" }).getByRole("row").filter({ hasText: "ci" })).toHaveCount(0);
  await expect(app.api("GET", "/v1/users/webop", undefined, token)).rejects.toThrow(/401/);
});

test("main pages: no serious accessibility violations; screenshots at 1280×720 and phone width", async ({ page, app }) => {
  await app.api("POST", "/v1/webhooks", { url: "http://127.0.0.1:9/hook", events: ["volume.*"] }).catch(() => undefined);
  await signIn(page, app);
  const pages = ["/", "/applications", "/hosts", "/policies", "/volumes", "/volumes/pipeline", "/clones", "/mounts", "/jobs", "/vms", "/events", "/audit", "/webhooks", "/users"];
  for (const p of pages) {
    await page.goto(app.url + p);
    await expect(page.getByRole("heading", { level: 1 })).toBeVisible();
    await page.waitForLoadState("networkidle");
    const r = await new AxeBuilder({ page }).analyze();
    const bad = r.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
    expect(bad.map((v) => `${p}: ${v.id} ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`)).toEqual([]);
    const name = p === "/" ? "dashboard" : p.slice(1).replace(/\//g, "-");
    await page.screenshot({ path: screenshotPath(name), fullPage: true });
  }
  await page.setViewportSize({ width: 390, height: 844 });
  for (const p of ["/", "/volumes"]) {
    await page.goto(app.url + p);
    await expect(page.getByRole("heading", { level: 1 })).toBeVisible();
    await page.waitForLoadState("networkidle");
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    expect(width, `${p} fits a phone's width`).toBeLessThanOrEqual(400);
    await page.screenshot({ path: screenshotPath(`phone${p === "/" ? "-dashboard" : p.replace(/\//g, "-")}`), fullPage: true });
  }
});
