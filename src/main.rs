//! The `flashsale` command line: serve a role, migrate, seed, administer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use flashsale::app::AppState;
use flashsale::config::Settings;
use flashsale::infra::{db, telemetry};
use flashsale::modules::{auth, products};
use flashsale::roles::{self, Role};
use flashsale::seed;

// glibc's malloc spends a measurable share of each order in lock contention across the
// actix and tokio threads (see bench/RESULTS.md); mimalloc's per-thread heaps do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "flashsale", version, about = "Flash-sale e-commerce platform")]
struct Cli {
    /// Folder holding default.toml and the {FLASHSALE_ENV}.toml overrides.
    #[arg(long, env = "FLASHSALE_CONFIG_DIR", default_value = "config")]
    config_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform in one role; the same binary scales each role separately.
    Serve {
        /// api: HTTP routes; order-worker / notify-worker: queue consumers; all: everything.
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
    },
    /// Create the global and shard databases if missing and run their migrations (idempotent).
    Migrate,
    /// Generate demo and benchmark data (users sign in with the printed password).
    Seed {
        /// How many users to create (user0..userN-1@seed.flashsale.test).
        #[arg(long, default_value_t = 1000)]
        users: u64,
        /// How many products to create.
        #[arg(long, default_value_t = 0)]
        products: u64,
        /// How many of those products are on flash sale now (the first K).
        #[arg(long, default_value_t = 0)]
        flash_sales: u64,
    },
    /// Product search index.
    Search {
        #[command(subcommand)]
        action: SearchAction,
    },
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Subcommand)]
enum SearchAction {
    /// Empty this machine's index (search.index_dir) and build it again from PostgreSQL.
    Reindex,
    /// Bring this machine's index up to date (building it if empty), merge it and publish a
    /// copy into search.snapshot_dir, where starting API processes restore it from.
    Snapshot,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Give the user with EMAIL the admin role (effective at their next login or refresh).
    Grant { email: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config_dir) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("flashsale: {e}");
            return ExitCode::from(2);
        }
    };
    let service_name = match &cli.command {
        Command::Serve { role } => format!("flashsale-{}", role.name()),
        _ => "flashsale-cli".to_owned(),
    };
    telemetry::init(&settings.log, &settings.telemetry, &service_name);
    match run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "flashsale failed");
            eprintln!("flashsale: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Migrate => db::migrate(&settings.database).await?,
        Command::Serve { role } => {
            tracing::info!(?role, "starting");
            if settings.database.migrate_on_start {
                db::migrate(&settings.database).await?;
            }
            roles::serve(AppState::build(settings).await?, role).await?;
        }
        Command::Seed {
            users,
            products,
            flash_sales,
        } => {
            let state = AppState::build(settings).await?;
            let bar = progress_bar(Some(users), "users");
            let created = seed::seed_users(&state, users, |done| bar.set_position(done)).await?;
            bar.finish_and_clear();
            println!(
                "seeded {users} users ({created} new): user0..user{}@seed.flashsale.test, password `{}`",
                users.saturating_sub(1),
                seed::SEED_PASSWORD
            );
            let bar = progress_bar(Some(products), "products");
            let on_sale = flash_sales.min(products);
            let created =
                seed::seed_products(&state, products, on_sale, |done| bar.set_position(done))
                    .await?;
            bar.finish_and_clear();
            println!(
                "seeded {products} products ({created} new), {} on flash sale now",
                on_sale
            );
        }
        Command::Search {
            action: SearchAction::Reindex,
        } => {
            let state = AppState::build(settings).await?;
            let started = std::time::Instant::now();
            let bar = progress_bar(None, "indexed");
            let indexed = products::reindex(&state, |done| bar.set_position(done as u64)).await?;
            bar.finish_and_clear();
            println!(
                "indexed {indexed} products in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        Command::Search {
            action: SearchAction::Snapshot,
        } => {
            let Some(to) = settings.search.snapshot_dir.clone() else {
                return Err(
                    "search.snapshot_dir is not set (FLASHSALE__SEARCH__SNAPSHOT_DIR)".into(),
                );
            };
            let state = AppState::build(settings).await?;
            let started = std::time::Instant::now();
            let bar = progress_bar(None, "indexed");
            let (indexed, published) =
                products::publish_snapshot(&state, &to, |done| bar.set_position(done as u64))
                    .await?;
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            match published {
                Some(dir) => println!(
                    "indexed {indexed} changed products and published {} in {seconds:.1}s",
                    dir.display()
                ),
                None => println!("the catalogue is empty: no snapshot published"),
            }
        }
        Command::Admin {
            action: AdminAction::Grant { email },
        } => {
            let state = AppState::build(settings).await?;
            let user_id = auth::grant_admin(&state, &email).await?;
            println!(
                "{email} ({user_id}) is now an admin; it applies at their next login or refresh"
            );
        }
    }
    Ok(())
}

/// A progress bar on stderr (drawn only on a terminal): with a known total, a bar with rate
/// and ETA; without, a counter with rate.
fn progress_bar(total: Option<u64>, what: &'static str) -> indicatif::ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            indicatif::ProgressBar::new(total),
            "{msg:>9} [{bar:40}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{msg:>9} {spinner} {human_pos} ({per_sec})",
        ),
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what);
    bar
}
