//! Logging set-up for every binary: `tracing` to stderr, filtered by
//! `RUST_LOG` when it is set, else at the binary's own default level.

pub use tracing_subscriber::filter::LevelFilter;

/// Starts logging to stderr. `RUST_LOG` directives win; where it is unset,
/// empty, or holds no valid directive, `default` applies (a daemon says
/// `INFO`, a command-line tool `WARN` or `ERROR`). Invalid directives in
/// `RUST_LOG` are skipped, the valid ones kept.
pub fn init(default: LevelFilter) {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(default.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
