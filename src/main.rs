use approval_bridge::cli::{Cli, Command, delegate, doctor, sessions};
use approval_bridge::config::LogFormat;
use approval_bridge::{startup, store, telemetry};

#[tokio::main]
async fn main() {
    let cli = Cli::parse_or_exit();
    if let Err(err) = run(cli.command).await {
        // `{:#}` keeps the whole cause chain on one line; a client error in it
        // may quote a URL with an API key.
        eprintln!(
            "approval-bridge: {}",
            telemetry::redact(&format!("{err:#}"))
        );
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(settings) => {
            telemetry::init(settings.log_format);
            let app = startup::Application::build(*settings).await?;
            app.run_until_stopped().await
        }
        Command::Migrate(database) => {
            telemetry::init(LogFormat::Text);
            let pool = store::connect(&database).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        // Logs go to stderr: stdout carries the table.
        Command::Doctor(settings) => {
            telemetry::init_stderr(settings.log_format);
            if doctor::run(*settings).await? {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
        // No log subscriber: stdout carries only the command's output.
        Command::Delegate(command) => {
            let delegate::DelegateCommand::Register(args) = &command;
            telemetry::register_safe_settings(&args.settings);
            delegate::run(command).await
        }
        Command::Sessions(command) => {
            telemetry::init_stderr(LogFormat::Text);
            sessions::run(command).await
        }
        #[cfg(feature = "sandbox")]
        Command::Sandbox(args) => sandbox(args).await,
        #[cfg(feature = "sandbox")]
        Command::Bench(args) => {
            telemetry::init_stderr(LogFormat::Text);
            approval_bridge::bench::run(args).await
        }
    }
}

#[cfg(feature = "sandbox")]
async fn sandbox(args: approval_bridge::cli::SandboxArgs) -> anyhow::Result<()> {
    use approval_bridge::sandbox::{EnvFormat, Sandbox, SandboxOptions};
    use approval_bridge::startup::listen_for_stop;
    use std::io::Write;

    // Logs go to stderr: stdout carries the banner or the environment only.
    telemetry::init_stderr(LogFormat::Text);
    let print_env = args
        .print_env
        .or(args.world_only.then_some(EnvFormat::Shell));
    let options = SandboxOptions {
        port: args.port,
        block_time: args.block_time,
        api_token: args.api_token,
        webhook_secret: args.webhook_secret,
        database_url: args.database_url,
        batch_window_secs: args.batch_window_secs,
        confirmations: args.confirmations,
        world_only: args.world_only,
        bridge_port: args.bridge_port,
        nodes: args.nodes,
        slots: args.slots,
        ..SandboxOptions::default()
    };
    // Listening starts before the sandbox announces itself (see listen_for_stop).
    let stop = listen_for_stop();
    let sandbox = Sandbox::start(options).await?;
    match print_env {
        Some(format) => {
            eprintln!("{}", sandbox.banner());
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(sandbox.env.render(format).as_bytes())?;
            stdout.flush()?;
        }
        None => println!("{}", sandbox.banner()),
    }
    sandbox.run_until(stop).await
}
