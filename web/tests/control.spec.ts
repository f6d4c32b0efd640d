// The control-plane pages: a host enrolled with a token made in the
// console, a policy, applications, and the dashboard's applications by RPO
// state as the (fake) appliance clock moves past the objective.
import { expect, Page, PASSWORD, signIn, test } from "./appliance";

async function signInIfAsked(page: Page, user = "alice") {
  const form = page.getByRole("form", { name: "Sign in" });
  const who = page.getByTestId("who");
  await expect(form.or(who)).toBeVisible();
  if (await form.isVisible()) {
    await page.getByLabel("User", { exact: true }).fill(user);
    await page.getByLabel("Password", { exact: true }).fill(PASSWORD);
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect(who).toBeVisible();
  }
}

test("hosts, policies and applications; the dashboard shows applications by RPO state", async ({ page, app }) => {
  await signIn(page, app);
  await page.getByRole("link", { name: "Hosts", exact: true }).click();
  await page.getByLabel("Host name (optional)", { exact: true }).fill("db1");
  await page.getByRole("button", { name: "Make an enrolment token" }).click();
  const token = await page.getByTestId("enrol-token").innerText();
  // The agent's side of the enrolment, as cdm-agent enrol sends it.
  const r = await fetch(`${app.url}/v1/agent/enrol`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token, hostname: "db1.example", version: "test", os: "linux" }),
  });
  expect(r.status).toBe(201);
  await page.reload();
  await expect(page.getByRole("table", { name: "Hosts" }).getByRole("row").filter({ hasText: "db1.example" })).toBeVisible();

  await page.getByRole("link", { name: "Policies", exact: true }).click();
  const pf = page.getByRole("form", { name: "Create a policy" });
  await pf.getByLabel("Policy name", { exact: true }).fill("hourly");
  await pf.getByLabel("RPO (seconds)", { exact: true }).fill("3600");
  await pf.getByRole("button", { name: "Create policy" }).click();
  await expect(page.getByRole("table", { name: "Policies" })).toContainText("every 3600 s");

  await page.getByRole("link", { name: "Applications", exact: true }).click();
  const af = page.getByRole("form", { name: "Register an application" });
  for (const [name, policy] of [
    ["sales", "hourly"],
    ["scratch", ""],
  ]) {
    await af.getByLabel("Host", { exact: true }).fill("db1");
    await af.getByLabel("Application name", { exact: true }).fill(name);
    await af.getByLabel("Config (JSON)", { exact: true }).fill('{"data_dir": "/var/lib/postgresql/16/main"}');
    await af.getByLabel("Policy", { exact: true }).selectOption(policy);
    await af.getByRole("button", { name: "Register" }).click();
    await expect(page.getByRole("table", { name: "Applications" }).getByRole("link", { name, exact: true })).toBeVisible();
  }
  // A policy in use cannot be deleted: the API's answer is shown.
  await page.getByRole("link", { name: "Policies", exact: true }).click();
  const prow = page.getByRole("table", { name: "Policies" }).getByRole("row").filter({ hasText: "hourly" });
  await prow.getByRole("button", { name: "Delete" }).click();
  await prow.getByRole("button", { name: "Confirm delete" }).click();
  await expect(page.getByRole("alert")).toContainText("409");

  await page.getByRole("link", { name: "Dashboard", exact: true }).click();
  await expect(page.getByTestId("rpo-unprotected")).toHaveText("1");
  await expect(page.getByTestId("rpo-late")).toHaveText("0");
  // Two hours on the appliance's clock without a point: sales is late.
  await app.api("POST", "/v1/clock", { advance_secs: 7200 });
  await page.reload();
  await signInIfAsked(page);
  await expect(page.getByTestId("rpo-late")).toHaveText("1");
  const late = page.getByRole("table", { name: "Late and failing applications" });
  await expect(late.getByRole("row").filter({ hasText: "sales" })).toContainText("late");
  await late.getByRole("link", { name: "sales" }).click();
  await expect(page.getByRole("heading", { name: "Application sales" })).toBeVisible();
  await expect(page.getByRole("table", { name: "Points" })).toContainText("No point yet.");
});
