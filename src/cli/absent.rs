//! What a command does where no repository exists: only commands that store something
//! make one; the others answer as for an empty repository, say there is none, or refuse.

use keepfs::config::Config;

use super::args::*;

/// The home of a repository that does not exist, when a command named versions in it:
/// its "does not exist" error says so.
pub(crate) static NO_REPOSITORY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What a command does where no repository exists. Only a command that stores
/// something (a backup, a mount, `init`, an import) makes one; the others must leave
/// nothing behind (a mistyped KEEPFS_HOME is seen at once).
pub(crate) enum Absent {
    /// It makes the repository.
    Create,
    /// It reads: it answers as for an empty one, and says there is none.
    Read,
    /// It names versions: "does not exist", saying there is no repository, in one line.
    NamesVersions,
    /// It works on what is stored (a cleanup): nothing to do.
    NothingToDo,
    /// It changes what must be there: refused with this message.
    Refuse(String),
}

pub(crate) fn where_absent(c: &Command, config: &Config) -> Absent {
    let see = "`keepfs config check` shows the configuration used";
    let home = config.home.display();
    match c {
        Command::Ls { .. }
        | Command::Due { .. }
        | Command::Sla { .. }
        | Command::Stats { .. }
        | Command::StorageUsage { .. }
        | Command::Storage { .. }
        | Command::Database { action: DatabaseAction::Sessions { .. } }
        | Command::BatchScrub { .. }
        | Command::BatchDeepScrub { .. }
        | Command::Enforce { .. }
        | Command::Metadata { action: MetadataAction::Backup { .. } } => Absent::Read,
        Command::Diff { .. }
        | Command::Restore { .. }
        | Command::Scrub { .. }
        | Command::DeepScrub { .. }
        | Command::Label { .. }
        | Command::Expire { .. }
        | Command::Rm { .. }
        | Command::Protect { .. }
        | Command::Unprotect { .. }
        | Command::Metadata { action: MetadataAction::Export { .. } } => Absent::NamesVersions,
        Command::Cleanup { .. } => Absent::NothingToDo,
        Command::Database { action: DatabaseAction::Migrate { .. } } => Absent::Refuse(format!(
            "there is no catalog {} to migrate (no repository at {home} yet); {see}",
            config.catalog_location().display()
        )),
        // A continuation names a version; key changes need a keyring.
        Command::Backup { continue_uid: Some(uid), .. } => {
            Absent::Refuse(format!("version {uid} does not exist: there is no repository at {home} yet; {see}"))
        }
        Command::Key { action: KeyAction::Rotate { .. } | KeyAction::Rekey { .. } | KeyAction::Remove { .. } } => {
            Absent::Refuse(format!("there is {}, so no keys to change; {see}", no_repository(config)))
        }
        _ => Absent::Create,
    }
}

/// What is missing where no repository exists: the home and the catalog it would have.
pub(crate) fn no_repository(config: &Config) -> String {
    format!("no repository at {} yet (no catalog {})", config.home.display(), config.catalog_location().display())
}
