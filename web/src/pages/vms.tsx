// VMs: the category tree (by OS, application, keyword, path or pool) of the
// inventory an agent classified, and a backup job for one category.
import { useState } from "preact/hooks";
import { call, get, may, S } from "../api";
import { ErrorBox, Field, Link, Table, useAction, useLoad, useSession, val } from "../ui";

function Group({ g, prefix, pick }: { g: S["VmGroup"]; prefix: string; pick: (c: string) => void }) {
  const cat = `${prefix}:${g.name}`;
  return (
    <li>
      <details open>
        <summary>
          {g.name} <span class="muted">({g.vms?.length ?? 0} VMs)</span>{" "}
          <button type="button" onClick={() => pick(cat)}>
            Back up this category
          </button>
        </summary>
        {g.groups && g.groups.length > 0 && (
          <ul>
            {g.groups.map((c) => (
              <Group g={c} prefix={prefix} pick={pick} />
            ))}
          </ul>
        )}
        {g.vms && g.vms.length > 0 && (
          <ul class="vms">
            {g.vms.map((v) => (
              <li>{v}</li>
            ))}
          </ul>
        )}
      </details>
    </li>
  );
}

export function Vms() {
  const s = useSession();
  const [by, setBy] = useState("os");
  const tree = useLoad(() => get<S["VmTree"]>(`/v1/vms/tree?by=${encodeURIComponent(by)}`), [by]);
  const vms = useLoad(() => get<S["VmRecord"][]>("/v1/vms"), []);
  const a = useAction();
  const [category, setCategory] = useState("");
  const [inventory, setInventory] = useState("");
  const [job, setJob] = useState<S["Job"] | null>(null);
  const prefix = by.startsWith("keyword:") ? "keyword" : by;
  return (
    <section>
      <h1>Virtual machines</h1>
      <Field label="Group by (os, app, keyword:WORD, path, pool)">
        <input value={by} onChange={(e) => setBy(val(e))} name="by" />
      </Field>
      <ErrorBox error={tree.error || vms.error || a.error} />
      <ul class="tree">{tree.data?.groups.map((g) => <Group g={g} prefix={prefix} pick={setCategory} />)}</ul>
      {may(s, "admin") && (
        <form
          class="form"
          aria-label="Back up a category"
          onSubmit={(e) => {
            e.preventDefault();
            a.run(async () => setJob(await call<S["Job"]>("POST", "/v1/jobs", { kind: "vm-backup", inventory, category })));
          }}
        >
          <Field label="Category">
            <input required value={category} onInput={(e) => setCategory(val(e))} name="category" />
          </Field>
          <Field label="Inventory on the appliance">
            <input required value={inventory} onInput={(e) => setInventory(val(e))} name="inventory" />
          </Field>
          <button type="submit">Back up</button>
        </form>
      )}
      {job && (
        <p role="status">
          Started <Link href={`/jobs/${job.id}`}>job #{job.id}</Link>.
        </p>
      )}
      <h2>Inventory</h2>
      <Table
        label="VMs"
        rows={vms.data}
        empty="No inventory: an agent puts one with PUT /v1/vms."
        cols={[
          { key: "name", label: "Name", value: (v) => v.name },
          { key: "os", label: "OS", value: (v) => v.os || v.os_family || "" },
          { key: "apps", label: "Applications", value: (v) => (v.apps ?? []).join(", ") },
          { key: "pool", label: "Pool", value: (v) => v.pool ?? "" },
          { key: "path", label: "Storage", value: (v) => v.storage_path ?? "" },
        ]}
      />
    </section>
  );
}
