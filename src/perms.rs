//! Who may read a repository: the modes keepfs creates its files and directories with.
//! Owner-only by default (files 0600, directories 0700), so no other local user can read
//! the backed-up disks of a plaintext repository; `file_mode` in the configuration widens
//! them for a repository a group shares (docs/configuration.md). Every mode is applied
//! where the file or directory is created (`OpenOptionsExt::mode`, `DirBuilderExt::mode`),
//! never through the process umask, which can still only narrow them. Existing files and
//! directories keep the modes they have.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The modes of new files and of new directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    pub file: u32,
    pub dir: u32,
}

impl Default for Modes {
    fn default() -> Modes {
        Modes::PRIVATE
    }
}

impl Modes {
    /// Owner only: files 0600, directories 0700.
    pub const PRIVATE: Modes = Modes { file: 0o600, dir: 0o700 };

    /// The modes for files created `file` (read and write bits only, the owner's both);
    /// directories get search permission wherever files get read permission.
    pub fn from_file_mode(file: u32) -> Result<Modes, String> {
        if file & !0o666 != 0 || file & 0o600 != 0o600 {
            return Err(format!(
                "file_mode {file:04o} is not allowed: use read/write bits only, with the owner's both (0600, 0640, 0660)"
            ));
        }
        let mut dir = 0o700 | file;
        if file & 0o040 != 0 {
            dir |= 0o010;
        }
        if file & 0o004 != 0 {
            dir |= 0o001;
        }
        Ok(Modes { file, dir })
    }

    /// Creates `path` and any missing parents with the directory mode.
    pub fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(self.dir).create(path)
    }

    /// A new unnamed file in `dir` (made with the directory mode if missing), gone with
    /// the process however it ends, with the file mode: an unnamed file (O_TMPFILE) is
    /// made with 0666 less the umask, which left spool files 0644.
    pub fn unnamed_file(&self, dir: &Path) -> io::Result<File> {
        self.create_dir_all(dir)?;
        let f = tempfile::tempfile_in(dir)?;
        f.set_permissions(Permissions::from_mode(self.file))?;
        Ok(f)
    }

    /// Options that create files with the file mode (set the access flags on them).
    pub fn options(&self) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.mode(self.file);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_modes_and_their_directories() {
        assert_eq!(Modes::from_file_mode(0o600).unwrap(), Modes::PRIVATE);
        assert_eq!(Modes::from_file_mode(0o640).unwrap(), Modes { file: 0o640, dir: 0o750 });
        assert_eq!(Modes::from_file_mode(0o660).unwrap(), Modes { file: 0o660, dir: 0o770 });
        assert!(Modes::from_file_mode(0o755).is_err(), "no execute bits");
        assert!(Modes::from_file_mode(0o400).is_err(), "the owner must write");
        assert!(Modes::from_file_mode(0o4600).is_err());
    }
}
