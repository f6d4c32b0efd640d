//! `cdmctl webhook`: webhook subscriptions and their deliveries.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum WebhookCmd {
    Create {
        url: String,
        /// Event type, MODULE.* or * (repeatable; default *).
        #[arg(long = "event")]
        events: Vec<String>,
        #[arg(long)]
        secret: Option<String>,
    },
    List,
    Show {
        id: u64,
    },
    Delete {
        id: u64,
    },
    Deliveries {
        id: u64,
    },
}

pub(crate) fn run(cmd: WebhookCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        WebhookCmd::Create {
            url,
            events,
            secret,
        } => {
            let events = if events.is_empty() {
                vec!["*".to_string()]
            } else {
                events
            };
            out.show(
                &c.create_webhook(&WebhookCreate {
                    url,
                    events,
                    secret,
                })?,
                webhook_show,
            );
        }
        WebhookCmd::List => out.show(&c.webhooks()?, |v| {
            table_of(v, &["ID", "URL", "EVENTS", "CREATED (UTC)"], |w| {
                vec![
                    w.id.to_string(),
                    w.url.clone(),
                    w.events.join(","),
                    time(w.created_unix),
                ]
            })
        }),
        WebhookCmd::Show { id } => out.show(&c.webhook(id)?, webhook_show),
        WebhookCmd::Delete { id } => {
            c.delete_webhook(id)?;
            out.say(format!("deleted webhook {id}"));
        }
        WebhookCmd::Deliveries { id } => out.show(&c.deliveries(id)?, |v| {
            table_of(
                v,
                &[
                    "ID",
                    "EVENT",
                    "TYPE",
                    "STATE",
                    "ATTEMPTS",
                    "STATUS",
                    "ERROR",
                    "UPDATED (UTC)",
                ],
                |d| {
                    vec![
                        d.id.to_string(),
                        d.event.to_string(),
                        d.event_type.clone(),
                        d.state.clone(),
                        d.attempts.to_string(),
                        opt(&d.last_status),
                        opt(&d.last_error),
                        time(d.updated_unix),
                    ]
                },
            )
        }),
    }
    Ok(())
}

fn webhook_show(w: &Webhook) -> String {
    let mut s = format!(
        "id: {}\nurl: {}\nevents: {}\ncreated: {}\n",
        w.id,
        w.url,
        w.events.join(", "),
        time(w.created_unix)
    );
    if let Some(sec) = &w.secret {
        s.push_str(&format!("secret (shown once): {sec}\n"));
    }
    s
}
