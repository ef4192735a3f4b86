//! The `keepfs` command: parses arguments, calls the engine, prints results. Errors become
//! one line on stderr and an exit code (see `keepfs::error::exit`). Every line goes out
//! through `output` (`out!`, `report!`, `note!`), never `println!`, which panics when a
//! write fails.

#[macro_use]
mod cli;

use cli::absent::NO_REPOSITORY;
use cli::args::{Cli, cli_command};
use cli::commands::{emit_metrics, run};
use cli::{mount_options, output, print, title};
use keepfs::error::{Error, exit};

fn main() {
    // First, before any thread exists (it moves the environment strings; see title).
    title::init();
    // A source truncated while mapped is caught by the library (keepfs::source::sigbus).
    // `keepfs mount DIR -o OPTIONS` (mount(8) through mount.fuse3, from /etc/fstab).
    let args = match mount_options::translate(std::env::args().collect()) {
        Ok(args) => args,
        Err(e) => {
            note!("keepfs: error: {e}");
            output::finish();
            std::process::exit(exit::USAGE);
        }
    };
    let matches = cli_command().try_get_matches_from(args).unwrap_or_else(|e| {
        use clap::error::ErrorKind;
        let code = match e.kind() {
            // What was asked for (--help, --version) goes to stdout; a write that fails
            // (a full disk) is a failure, as for every other output.
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => match e.print() {
                Ok(()) => e.exit_code(),
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
                Err(err) => {
                    note!("keepfs: error: cannot write to standard output: {err}");
                    exit::FAILURE
                }
            },
            // `keepfs` alone, or a command group without its command: the help, on stderr.
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                e.exit_code()
            }
            _ => {
                print::usage_error_json(&e);
                note!("keepfs: error: {}", print::usage_error_line(&e));
                e.exit_code()
            }
        };
        output::finish();
        std::process::exit(code)
    });
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    print::set_json(print::wants_json(&matches));
    print::set_table_style(cli.machine_output, cli.skip_header);
    let metrics_out = (cli.pushgateway.clone(), cli.metrics_file.clone(), cli.config.clone());
    let mut code = match run(cli) {
        Ok(code) => code,
        // The reader of a listing stopped reading (`keepfs ls | head -1`): not a failure.
        Err(e) if output::is_reader_gone(&e) => exit::OK,
        Err(e) => {
            let e = match (e, NO_REPOSITORY.get()) {
                (Error::VersionNotFound(uid), Some(home)) => Error::Invalid(format!(
                    "version {uid} does not exist: there is no repository at {home} yet; `keepfs config check` shows the configuration used"
                )),
                (e, _) => e,
            };
            note!("keepfs: error: {e}");
            if print::json() {
                print::error_json(&e);
            }
            e.exit_code()
        }
    };
    // A command refused as bad input changed nothing: one error line, no metrics.
    if code != exit::USAGE
        && let Err(e) = emit_metrics(metrics_out)
    {
        note!("keepfs: error: metrics: {e}");
        if code == exit::OK {
            code = e.exit_code();
        }
    }
    output::finish();
    std::process::exit(code);
}
