//! `cdmctl user`, `token`, `login` and `logout`: who may use the API.

use std::io::Read;

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, time, Out};
use crate::units::parse_duration;

#[derive(Subcommand)]
pub(crate) enum UserCmd {
    Create {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        password_stdin: bool,
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    Update {
        name: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        /// Replaces the grants (give --grant none to clear them).
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    Create {
        user: String,
        name: String,
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
    List {
        user: String,
    },
    Delete {
        user: String,
        id: String,
    },
}

pub(crate) fn run_user(cmd: UserCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        UserCmd::Create {
            name,
            role,
            password_stdin,
            grants,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            out.show(
                &c.create_user(&UserCreate {
                    name,
                    role,
                    password,
                    grants,
                })?,
                user_show,
            );
        }
        UserCmd::List => out.show(&c.users()?, |v| {
            table_of(
                v,
                &["NAME", "ROLE", "GRANTS", "PASSWORD", "CREATED (UTC)"],
                |u| {
                    vec![
                        u.name.clone(),
                        u.role.clone(),
                        u.grants.join(","),
                        u.has_password.to_string(),
                        time(u.created_unix),
                    ]
                },
            )
        }),
        UserCmd::Show { name } => out.show(&c.user(&name)?, user_show),
        UserCmd::Update {
            name,
            role,
            password_stdin,
            grants,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            let grants = if grants.is_empty() {
                None
            } else {
                Some(grants.into_iter().filter(|g| g != "none").collect())
            };
            out.show(
                &c.update_user(
                    &name,
                    &UserUpdate {
                        role,
                        password,
                        grants,
                    },
                )?,
                user_show,
            );
        }
        UserCmd::Delete { name } => {
            c.delete_user(&name)?;
            out.say(format!("deleted user {name}"));
        }
    }
    Ok(())
}

pub(crate) fn run_token(cmd: TokenCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            user,
            name,
            expires_in,
        } => out.show(
            &c.create_token(
                &user,
                &TokenCreate {
                    name,
                    expires_in_secs: expires_in,
                },
            )?,
            token_created,
        ),
        TokenCmd::List { user } => out.show(&c.tokens(&user)?, |v| {
            table_of(v, &["ID", "NAME", "CREATED (UTC)", "EXPIRES (UTC)"], |t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    time(t.created_unix),
                    t.expires_unix.map(time).unwrap_or_else(|| "never".into()),
                ]
            })
        }),
        TokenCmd::Delete { user, id } => {
            c.delete_token(&user, &id)?;
            out.say(format!("deleted token {id} of {user}"));
        }
    }
    Ok(())
}

/// `cdmctl login NAME --password-stdin`: a session token.
pub(crate) fn login(
    name: String,
    password_stdin: bool,
    c: &Client,
    out: &Out,
) -> Result<(), CliError> {
    if !password_stdin {
        return Err(CliError::Usage(
            "give the password on stdin with --password-stdin".into(),
        ));
    }
    let password = read_password()?;
    out.show(&c.login(&Login { name, password })?, token_created);
    Ok(())
}

pub(crate) fn logout(c: &Client, out: &Out) -> Result<(), CliError> {
    c.logout()?;
    out.say("logged out: the token is revoked".to_string());
    Ok(())
}

fn user_show(u: &User) -> String {
    format!(
        "name: {}\nrole: {}\ngrants: {}\npassword: {}\ncreated: {}\n",
        u.name,
        u.role,
        u.grants.join(", "),
        if u.has_password { "set" } else { "none" },
        time(u.created_unix)
    )
}

fn token_created(t: &TokenCreated) -> String {
    format!(
        "token {} ({}) for user {}, expires {}:\n{}\n(shown once: store it now)\n",
        t.id,
        t.name,
        t.user,
        t.expires_unix.map(time).unwrap_or_else(|| "never".into()),
        t.token
    )
}

fn read_password() -> Result<String, CliError> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| CliError::Other(format!("cannot read the password from stdin: {e}")))?;
    let p = s.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        return Err(CliError::Usage("empty password on stdin".into()));
    }
    Ok(p)
}
