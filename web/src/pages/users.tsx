// Users (admins) and tokens (one's own, or anyone's for an admin). A new
// token's secret is shown once, here, and never again.
import { useState } from "preact/hooks";
import { call, get, may, S, seg } from "../api";
import { Confirm, ErrorBox, Field, Table, useAction, useLoad, useSession, val, when } from "../ui";

export function Users() {
  const s = useSession();
  const admin = may(s, "admin");
  const users = useLoad(() => (admin ? get<S["User"][]>("/v1/users") : Promise.resolve([] as S["User"][])), [admin]);
  const a = useAction();
  const [name, setName] = useState("");
  const [role, setRole] = useState("operator");
  const [pw, setPw] = useState("");
  const [del, setDel] = useState(false);
  const [who, setWho] = useState(s?.user ?? "");
  return (
    <section>
      <h1>Users and tokens</h1>
      <ErrorBox error={users.error || a.error} />
      {admin && (
        <>
          <form
            class="form"
            aria-label="Create a user"
            onSubmit={(e) => {
              e.preventDefault();
              const body: S["UserCreate"] = { name, role, password: pw || undefined, grants: del ? ["delete"] : [] };
              a.run(() => call("POST", "/v1/users", body), () => (setName(""), setPw(""), users.reload()));
            }}
          >
            <Field label="User name">
              <input required value={name} onInput={(e) => setName(val(e))} name="user" />
            </Field>
            <Field label="Role">
              <select value={role} onChange={(e) => setRole(val(e))} name="role">
                {["admin", "operator", "auditor"].map((r) => (
                  <option value={r}>{r}</option>
                ))}
              </select>
            </Field>
            <Field label="Password">
              <input type="password" autoComplete="new-password" value={pw} onInput={(e) => setPw(val(e))} name="password" />
            </Field>
            <label class="check">
              <input type="checkbox" checked={del} onChange={(e) => setDel((e.target as HTMLInputElement).checked)} /> may delete (operators)
            </label>
            <button type="submit">Create user</button>
          </form>
          <Table
            label="Users"
            rows={users.data}
            cols={[
              { key: "name", label: "Name", value: (u) => u.name },
              { key: "role", label: "Role", value: (u) => u.role },
              { key: "grants", label: "Grants", value: (u) => u.grants.join(", ") },
              { key: "pw", label: "Password", value: (u) => (u.has_password ? "set" : "none") },
              { key: "created", label: "Created", value: (u) => u.created_unix, render: (u) => when(u.created_unix) },
              {
                key: "actions",
                label: "Actions",
                value: () => "",
                render: (u) => (
                  <span class="row-actions">
                    <button type="button" onClick={() => setWho(u.name)}>
                      Tokens
                    </button>
                    {u.name !== s?.user && <Confirm label="Delete" danger onConfirm={() => a.run(() => call("DELETE", `/v1/users/${seg(u.name)}`), users.reload)} />}
                  </span>
                ),
              },
            ]}
          />
        </>
      )}
      {who && <Tokens user={who} />}
    </section>
  );
}

function Tokens({ user }: { user: string }) {
  const list = useLoad(() => get<S["Token"][]>(`/v1/users/${seg(user)}/tokens`), [user]);
  const a = useAction();
  const [name, setName] = useState("");
  const [days, setDays] = useState("");
  const [fresh, setFresh] = useState<S["TokenCreated"] | null>(null);
  return (
    <>
      <h2>Tokens of {user}</h2>
      <ErrorBox error={list.error || a.error} />
      <form
        class="form"
        aria-label="Create a token"
        onSubmit={(e) => {
          e.preventDefault();
          const body: S["TokenCreate"] = { name, expires_in_secs: days.trim() ? Math.round(Number(days) * 86400) : undefined };
          a.run(async () => setFresh(await call<S["TokenCreated"]>("POST", `/v1/users/${seg(user)}/tokens`, body)), () => (setName(""), list.reload()));
        }}
      >
        <Field label="Token name">
          <input required value={name} onInput={(e) => setName(val(e))} name="token" />
        </Field>
        <Field label="Expires in days (empty: never)">
          <input value={days} onInput={(e) => setDays(val(e))} name="days" />
        </Field>
        <button type="submit">Create token</button>
      </form>
      {fresh && (
        <div class="notice" role="status">
          Token {fresh.name}: <code data-testid="new-token">{fresh.token}</code> — copy it now, it is not shown again.{" "}
          <button type="button" onClick={() => setFresh(null)}>
            Done
          </button>
        </div>
      )}
      <Table
        label={`Tokens of ${user}`}
        rows={list.data}
        cols={[
          { key: "name", label: "Name", value: (t) => t.name },
          { key: "id", label: "Id", value: (t) => t.id },
          { key: "created", label: "Created", value: (t) => t.created_unix, render: (t) => when(t.created_unix) },
          { key: "expires", label: "Expires", value: (t) => t.expires_unix ?? 0, render: (t) => when(t.expires_unix) },
          {
            key: "actions",
            label: "Actions",
            value: () => "",
            render: (t) => <Confirm label="Revoke" danger onConfirm={() => a.run(() => call("DELETE", `/v1/users/${seg(user)}/tokens/${seg(t.id)}`), list.reload)} />,
          },
        ]}
      />
    </>
  );
}
