//! The `keepfs` command: parses arguments, calls the engine, prints results. Errors become
//! one line on stderr and an exit code (see `keepfs::error::exit`). Every line goes out
//! through `output` (`out!`, `report!`, `note!`), never `println!`, which panics when a
//! write fails.

#[macro_use]
mod output;
mod cli_output;
mod help;
mod mount_options;
mod title;

use clap::{Parser, Subcommand, ValueEnum};
use cli_output::to_json;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::config::Config;
use keepfs::error::{Error, Result, exit};
use keepfs::filter::Filter;
use keepfs::progress::Progress;
use keepfs::restore::RestoreOptions;
use keepfs::scrub::ScrubOptions;
use keepfs::session::{Overlays, SessionService};
use keepfs::source::Url;
use keepfs::units::{check_block_size, format_size, parse_size};
use keepfs::version::{Version, VersionUid, parse_label};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "keepfs", version, about = "Block-level deduplicating backups of disk images and block devices")]
struct Cli {
    /// Configuration file (default: $KEEPFS_CONFIG, then /etc/keepfs/keepfs.toml, else the
    /// embedded default repository under $KEEPFS_HOME, /var/lib/keepfs as root, or ~/.local/share/keepfs)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// After the command, push the repository's metrics to this Prometheus Pushgateway
    /// (http://HOST:9091; group job=keepfs unless the URL names one)
    #[arg(long, global = true, value_name = "URL")]
    pushgateway: Option<String>,
    /// After the command, write the repository's metrics to this file, atomically (for
    /// node-exporter's textfile collector: a NAME.prom in its directory)
    #[arg(long, global = true, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Machine-readable tables (backy2's -m): cells separated by '|', sizes in bytes
    #[arg(short = 'm', long)]
    machine_output: bool,
    /// Tables without their header line (backy2's -s)
    #[arg(short = 's', long)]
    skip_header: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Back up an image (file:///path, null://SIZE or rbd:POOL[/NS]/IMAGE[@SNAP]) as a new version of NAME
    Backup {
        /// The image: a path (disk.img, /dev/vg0/snap), file:///path, or null://SIZE
        source: String,
        /// The backup's name (versions of one image share it), e.g. vm1
        name: String,
        /// Snapshot name to record with the version (default: an rbd: source's @SNAP)
        #[arg(short, long)]
        snapshot: Option<String>,
        /// Label k=v (or k for an empty value); repeatable
        #[arg(short, long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// Block size, a power of two from 4k to 32M (default from the config, 4M)
        #[arg(short = 'b', long)]
        block_size: Option<String>,
        /// Storage to write to (default: default_storage)
        #[arg(short = 'S', long)]
        storage: Option<String>,
        /// Expiry date (ISO 8601, e.g. 2027-01-31 or "2027-01-31 12:00:00")
        #[arg(short, long)]
        expire: Option<String>,
        /// Resume this incomplete version (after a crash or a storage outage)
        #[arg(short, long = "continue", value_name = "UID")]
        continue_uid: Option<String>,
        /// Read only the regions this file lists (`rbd diff --format=json` output)
        #[arg(long, value_name = "FILE")]
        hints: Option<PathBuf>,
        /// Take the blocks the hints do not list from this version (same name)
        #[arg(long, value_name = "UID")]
        base: Option<String>,
        /// Percent of the blocks the hints call unchanged to check against the base first
        /// (at least one block)
        #[arg(long, value_name = "PERCENT", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=100))]
        hints_check: u8,
        /// RBD: read only what librbd says changed since this snapshot (needs --base)
        #[arg(long, value_name = "SNAP", conflicts_with = "hints")]
        diff_from: Option<String>,
        /// With --diff-from: whole objects (librbd's fast diff) instead of exact extents
        #[arg(long, requires = "diff_from")]
        whole_object: bool,
        /// Add backy2's b_daily / b_weekly / b_monthly labels to the first backup of the
        /// name in each day / ISO week / month
        #[arg(long)]
        auto_tags: bool,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Ceph RBD's nightly routine: snapshot, back up (differentially when possible), drop old snapshots
    #[command(
        after_help = "Examples:\n  keepfs rbd-backup pool/vm1\n  keepfs rbd-backup --prefix nightly- --keep-snapshots 2 pool/ns/vm1\n  keepfs rbd-backup --all pool"
    )]
    RbdBackup {
        /// POOL[/NAMESPACE]/IMAGE
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        image: Option<String>,
        /// Every image of POOL[/NAMESPACE], one after the other
        #[arg(long, value_name = "POOL")]
        all: Option<String>,
        /// Snapshots made and removed by this routine start with this
        #[arg(long, default_value = "b-")]
        prefix: String,
        /// Prefixed snapshots to keep after a successful backup (the newest)
        #[arg(long, default_value_t = 1)]
        keep_snapshots: usize,
        /// Storage to write initial backups to (default: default_storage)
        #[arg(short = 'S', long)]
        storage: Option<String>,
    },
    /// Restore a version to a file, block device (file:///path) or RBD image (rbd:POOL/IMAGE)
    Restore {
        /// The version to restore (with --delta-from: the version the target gets, UID2)
        uid: String,
        /// A file (created; an existing one needs --force) or a block device, as a path or file:///path
        target: String,
        /// Overwrite an existing target
        #[arg(long)]
        force: bool,
        /// Skip zero blocks (holes in files; a device must already be zeroed)
        #[arg(long)]
        sparse: bool,
        /// Finish an interrupted restore: blocks already written and correct are kept
        #[arg(short, long = "continue")]
        resume: bool,
        /// With --force: write into an existing file itself instead of a new file renamed
        /// over it (keeps its other hard links; its old content is gone from the start)
        #[arg(long)]
        in_place: bool,
        /// The target holds this version (checked by sampling): write only the blocks
        /// that differ from it (a file is resized; a smaller block device is refused)
        #[arg(long, value_name = "UID1", conflicts_with_all = ["force", "sparse", "resume", "in_place"])]
        delta_from: Option<String>,
        /// With --delta-from: percent of the unchanged blocks to compare with UID1 first
        /// (at least one block; 0 skips the check)
        #[arg(long, value_name = "PERCENT", default_value_t = keepfs::delta::DEFAULT_CHECK_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100))]
        delta_check: u8,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List versions, optionally filtered: 'name == "db" and labels["env"] == "prod"'
    Ls {
        /// Which versions, e.g. 'name == "db" and labels["env"] == "prod"' (default all)
        filter: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Only versions whose expiry date has passed
        #[arg(short, long)]
        expired: bool,
    },
    /// Change labels: k=v sets, k= (or k) sets an empty value, k- removes
    Label {
        /// The version
        uid: String,
        /// k=v sets a label, k= (or k) sets it empty, k- removes it
        #[arg(required = true, value_name = "CHANGE")]
        changes: Vec<String>,
    },
    /// Check that every object of a version is there and well-formed (light)
    Scrub {
        /// The version to check
        uid: String,
        /// Check a random N% of the blocks
        #[arg(short, long, default_value_t = 100)]
        percent: u8,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Decode every block of a version and verify its checksum (and against --source)
    DeepScrub {
        /// The version to check
        uid: String,
        /// Check a random N% of the blocks
        #[arg(short, long, default_value_t = 100)]
        percent: u8,
        /// Compare with the original image too (backy2's scrub -s)
        #[arg(short, long)]
        source: Option<String>,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Light scrub of every version a filter selects
    BatchScrub {
        /// Which versions (a filter, as for ls; default all)
        filter: Option<String>,
        /// Check a random N% of the blocks of each
        #[arg(short, long, default_value_t = 100)]
        percent: u8,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Deep scrub of every version a filter selects
    BatchDeepScrub {
        /// Which versions (a filter, as for ls; default all)
        filter: Option<String>,
        /// Check a random N% of the blocks of each
        #[arg(short, long, default_value_t = 100)]
        percent: u8,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove the versions retention rules do not keep (per name; never protected ones)
    Enforce {
        /// e.g. latest3,hours24,days30,weeks4,months12,years3
        rules: String,
        /// Only versions this filter selects
        filter: Option<String>,
        /// Print what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Which backups are due now, per name (backy2's due): schedulers, expiry date, due since
    Due {
        /// Only this backup name (it may have no versions yet)
        name: Option<String>,
        /// Schedulers to check, comma-separated (configured with [[scheduler]])
        #[arg(short, long, default_value = "daily")]
        schedulers: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Where the schedulers' promises are broken (backy2's sla); empty when all is well
    Sla {
        /// Only this backup name
        name: Option<String>,
        /// Schedulers to check, comma-separated
        #[arg(short, long, default_value = "daily")]
        schedulers: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Prepare a storage before its first backup; --encrypt makes it encrypted with the key
    /// from KEEPFS_KEY_FILE / KEEPFS_PASSPHRASE / the configuration (or a prompt)
    Init {
        #[arg(long)]
        encrypt: bool,
        /// The storage (default: default_storage)
        #[arg(short = 'S', long)]
        storage: Option<String>,
    },
    /// The configured storages
    Storage {
        #[command(subcommand)]
        action: StorageAction,
    },
    /// Master keys of an encrypted storage
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Export or import versions' metadata (JSON)
    Metadata {
        #[command(subcommand)]
        action: MetadataAction,
    },
    /// The metadata database
    Database {
        #[command(subcommand)]
        action: DatabaseAction,
    },
    /// Check the configuration and show what it resolves to
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Set a version's expiry date (ISO 8601), or clear it with ''
    Expire {
        /// The version
        uid: String,
        /// The new expiry date (ISO 8601, e.g. 2027-01-31), or '' to clear it
        date: String,
    },
    /// Remove versions (their blocks are freed by `cleanup`)
    Rm {
        /// The versions to remove
        #[arg(required = true)]
        uids: Vec<String>,
        /// Remove even protected versions and versions younger than rm_min_age_days
        #[arg(long)]
        force: bool,
        /// Print what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Protect versions from removal
    Protect {
        /// The versions to protect
        #[arg(required = true)]
        uids: Vec<String>,
    },
    /// Allow versions to be removed again
    Unprotect {
        /// The versions to unprotect
        #[arg(required = true)]
        uids: Vec<String>,
    },
    /// Mount the repository as a filesystem (by_version/, by_name/, incoming/), in the
    /// foreground until `fusermount3 -u DIR`
    ///
    /// Runs in the foreground until the filesystem is unmounted: `fusermount3 -u DIR` (or
    /// `umount DIR` as root), Ctrl-C or SIGTERM unmount it cleanly. With --daemon it
    /// detaches once mounted and prints the server's pid.
    Mount {
        /// An empty directory to mount on
        mountpoint: PathBuf,
        /// Refuse all writes (EROFS)
        #[arg(long)]
        read_only: bool,
        /// Keep writes to versions' data only while mounted (throw-away VM boots)
        #[arg(long)]
        discard_writes: bool,
        /// Detach and run in the background once mounted; its messages go to mount.log in
        /// the keepfs home ($KEEPFS_HOME, /var/lib/keepfs as root, else ~/.local/share/keepfs)
        #[arg(long)]
        daemon: bool,
        /// FUSE worker threads
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Keep what is read from data in the kernel's page cache (fast re-reads, mmap)
        #[arg(long)]
        page_cache: bool,
        /// Let other users in (e.g. libvirt's qemu); the kernel checks --uid/--gid/--mode
        #[arg(long)]
        allow_other: bool,
        /// Owner of the files (a number; default: the mount's user)
        #[arg(long, requires = "allow_other")]
        uid: Option<u32>,
        /// Group of the files (a number; default: the mount's group)
        #[arg(long, requires = "allow_other")]
        gid: Option<u32>,
        /// Mode of the files, octal (e.g. 0640; directories get x where readable)
        #[arg(long, requires = "allow_other", value_parser = parse_mode)]
        mode: Option<u16>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9198)
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Per version: size, sparse, shared and exclusive bytes, stored bytes, and what rm + cleanup would free
    #[command(
        name = "storage-usage",
        after_help = "Shared blocks are referenced by another version of the same storage too; the\nexclusive ones are what `keepfs rm` of the version and then `keepfs cleanup` free.\n\nExamples:\n  keepfs storage-usage\n  keepfs storage-usage 'name == \"db\"' --format json"
    )]
    StorageUsage {
        /// Which versions (a filter, as for ls; default all)
        filter: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Per backup: bytes read, written, stored, deduplicated and sparse, duration, throughput
    #[command(after_help = "Examples:\n  keepfs stats\n  keepfs stats 'name == \"db\"' --format json")]
    Stats {
        /// Which versions (a filter, as for ls; default all)
        filter: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// The byte ranges that differ between two versions, from their indexes (no data read)
    #[command(
        after_help = "--format json prints rbd diff's shape, usable as `backup --hints`.\n\nExamples:\n  keepfs diff V0000000001 V0000000002\n  keepfs diff --format json V0000000001 V0000000002 > changes.json\n  keepfs backup --hints changes.json --base V0000000001 file:///dev/vg0/snap vm1"
    )]
    Diff {
        /// The older version
        old: String,
        /// The newer version
        new: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completion {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Write man pages for keepfs and each of its commands into DIR
    Man {
        /// The directory to write into (created if missing)
        dir: PathBuf,
    },
    /// Serve versions as network block devices (exports: version uids and NAME@latest)
    Nbd {
        /// Address to listen on (anything but loopback is an explicit choice)
        #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "socket")]
        listen: String,
        /// Listen on this Unix socket instead
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Refuse all writes (EPERM); clients may use several connections
        #[arg(long)]
        read_only: bool,
        /// Drop a connection's writes when it disconnects instead of making a version
        #[arg(long)]
        discard_writes: bool,
        /// Require TLS (NBD_OPT_STARTTLS) with this PEM certificate chain
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9198)
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// How fast this host hashes, compresses and encrypts, and each storage writes and
    /// reads, next to a reference (as Proxmox Backup's benchmark)
    Bench {
        /// Only this storage (repeatable; default: every configured storage)
        #[arg(short = 'S', long = "storage", value_name = "NAME")]
        storages: Vec<String>,
        /// Bytes to write to and read from each storage (rounded up to whole blocks)
        #[arg(long, default_value = "64M")]
        size: String,
        /// Seconds each CPU test runs
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Only the CPU tests (no storage is touched)
        #[arg(long)]
        cpu_only: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Delete stored objects that no version references
    Cleanup {
        /// Print what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Only this storage (default: every configured storage)
        #[arg(short = 'S', long)]
        storage: Option<String>,
        /// Output: table (lines for people) or json (one object on stdout, errors too)
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum MetadataAction {
    /// Write the metadata of versions to FILE ('-' for standard output)
    Export {
        /// Version uids, then the file
        #[arg(required = true, num_args = 2.., value_name = "UID... FILE")]
        args: Vec<String>,
    },
    /// Import versions from a file written by export ('-' for standard input)
    Import {
        /// A file written by `metadata export`, or '-' for standard input
        file: PathBuf,
    },
    /// Write the metadata objects of versions to their storage again (all when no filter)
    Backup {
        /// Which versions (a filter, as for ls; default all)
        filter: Option<String>,
    },
    /// Bring versions back into the database from their metadata objects in storage
    Restore {
        /// The versions to bring back
        #[arg(required = true)]
        uids: Vec<String>,
        /// Replace the metadata of versions the database holds (a damaged block index)
        /// with their storage's copy
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum StorageAction {
    /// Every configured storage: kind, location, default, encrypted, versions
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Objects and bytes of one storage (from the database)
    Stats {
        /// The storage (as in `keepfs storage list`)
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Write a new random key (32 bytes, hex) to FILE, readable by its owner only
    New {
        /// Where to write the key (refused if it exists)
        file: PathBuf,
    },
    /// The keys in a storage's keyring and how many objects each protects
    List {
        #[arg(short = 'S', long)]
        storage: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Make a new key current (give it with --new-key-file, --new-passphrase-file or
    /// KEEPFS_NEW_PASSPHRASE); the current key opens the keyring
    Rotate {
        #[arg(short = 'S', long)]
        storage: Option<String>,
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Rewrap every object's data key with the current key (headers only)
    Rekey {
        #[arg(short = 'S', long)]
        storage: Option<String>,
    },
    /// Remove an old key from the keyring (after `rekey`)
    Remove {
        /// The key's id (16 hex digits, from `keepfs key list`)
        id: String,
        #[arg(short = 'S', long)]
        storage: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate the configuration (--config, $KEEPFS_CONFIG, /etc/keepfs/keepfs.toml, or the
    /// embedded default) and print what it resolved: paths, storages, key sources. Never
    /// prints a secret; touches no repository.
    #[command(after_help = "Examples:\n  keepfs config check\n  keepfs --config /etc/keepfs/keepfs.toml config check")]
    Check,
}

#[derive(Subcommand)]
enum DatabaseAction {
    /// Recreate a lost database from the version and block objects in the storages
    Rebuild {
        /// If the database file is damaged ("database disk image is malformed"), move it
        /// aside (kept as <name>.damaged-<time>) and rebuild a new one
        #[arg(long)]
        replace_damaged: bool,
    },
    /// Copy the catalog into a new, empty one (SQLite to PostgreSQL or back) and check the copy
    #[command(
        after_help = "Examples:\n  keepfs database migrate --to postgresql://keepfs@db.example:5432/keepfs\n  keepfs database migrate --to /var/lib/keepfs/catalog-from-pg.sqlite\n\nThen set `database` in the configuration to the new catalog."
    )]
    Migrate {
        /// The new catalog: a postgresql://user@host:port/name URL or a new SQLite file path
        #[arg(long)]
        to: String,
    },
    /// The processes using the repository now, on every host: what each does, since when,
    /// and its last heartbeat (what `database migrate`, `key remove` and cleanup wait for)
    #[command(
        after_help = "Examples:\n  keepfs database sessions\n  keepfs database sessions --format json | jq -r '.[] | select(.writes) | .host'"
    )]
    Sessions {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// Progress on stderr: a bar on a terminal, a line every 10 s otherwise, and the
/// progress in the process title (`ps axfu`: `keepfs [backing up vm1 43% 850 MB/s ETA 2m]`,
/// see `title`) either way.
struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
    /// What the title calls the work ("backing up vm1").
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    /// Start, last progress line (no bar), last title update, and what is in progress.
    started: parking_lot::Mutex<(Instant, Instant, Instant, String)>,
}

impl CliProgress {
    fn new(label: String) -> CliProgress {
        CliProgress {
            bar: None,
            label,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: parking_lot::Mutex::new((Instant::now(), Instant::now(), Instant::now(), String::new())),
        }
    }
}

impl Progress for CliProgress {
    fn begin(&self, what: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        *self.started.lock() = (Instant::now(), Instant::now(), Instant::now(), what.to_string());
        title::set(&title::progress_title(&self.label, 0, total, 0.0));
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(0);
            bar.set_message(what.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total = self.total.load(Ordering::Relaxed).max(1);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        // The title at most once a second (and at the end); without a bar, a progress
        // line every 10 seconds.
        let mut s = self.started.lock();
        if s.2.elapsed().as_millis() >= 1000 || done >= total {
            let secs = s.0.elapsed().as_secs_f64().max(0.001);
            title::set(&title::progress_title(&self.label, done, total, secs));
            s.2 = Instant::now();
            if self.bar.is_none() && s.1.elapsed().as_secs() >= 10 {
                note!(
                    "{}: {}% ({} of {}, {:.0} MB/s)",
                    s.3,
                    done * 100 / total,
                    format_size(done),
                    format_size(total),
                    done as f64 / secs / 1e6
                );
                s.1 = Instant::now();
            }
        }
    }
    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("keepfs: warning: {msg}")),
            None => note!("keepfs: warning: {msg}"),
        }
    }
    fn end(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        title::reset();
    }
}

/// The progress of a long operation; `label` names it in the process title.
fn progress(label: impl Into<String>) -> CliProgress {
    let mut p = CliProgress::new(label.into());
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        p.bar = Some(bar);
    }
    p
}

/// The committed (not incomplete) versions a filter selects; all without one.
fn committed_uids(repo: &Repository, filter: Option<&str>) -> Result<Vec<VersionUid>> {
    let filter = filter.map(Filter::parse).transpose()?;
    Ok(repo
        .list(filter.as_ref())?
        .into_iter()
        .filter(|v| v.status != keepfs::version::Status::Incomplete)
        .map(|v| v.uid)
        .collect())
}

/// Scrubs every committed version a filter selects.
fn batch_scrub(repo: &Repository, filter: Option<&str>, percent: u8, deep: bool) -> Result<i32> {
    let uids = committed_uids(repo, filter)?;
    scrub_versions(repo, &uids, &ScrubOptions { deep, percent, source: None })
}

/// One line per damaged block: where it is in the image and which object holds it.
fn report_damaged(prefix: &str, b: &keepfs::restore::BadBlock) {
    note!(
        "keepfs: damaged: {prefix}block {} (bytes {}..{}) object {}: {}",
        b.index,
        b.offset,
        b.offset + b.len,
        b.object,
        b.reason
    );
}

/// Scrubs versions one after the other; exit 3 when any damage was found.
fn scrub_versions(repo: &Repository, uids: &[VersionUid], opts: &ScrubOptions) -> Result<i32> {
    let mut damaged = 0usize;
    let mut results = Vec::new();
    for &uid in uids {
        let p = progress(format!("{} {uid}", if opts.deep { "deep-scrubbing" } else { "scrubbing" }));
        let r = repo.scrub(uid, opts, &p)?;
        for b in &r.bad {
            report_damaged(&format!("{uid} "), b);
        }
        for m in &r.metadata {
            note!("keepfs: damaged: {m}");
        }
        results.push(serde_json::json!({
            "uid": uid.to_string(), "deep": opts.deep, "percent": opts.percent, "objects": r.objects,
            "ok": !r.damaged(), "revalidated": r.revalidated,
            "damaged_blocks": cli_output::bad_blocks_json(&r.bad), "metadata_damage": r.metadata,
        }));
        let what = if opts.deep { "deep-scrubbed" } else { "scrubbed" };
        if !r.damaged() {
            let again = if r.revalidated { "; it is valid again" } else { "" };
            note!("{what} {uid}: {} object(s) ({}% of blocks), all good{again}", r.objects, opts.percent);
        } else if r.bad.is_empty() {
            note!("keepfs: error: {what} {uid}: its metadata is damaged (see above)");
            damaged += 1;
        } else {
            note!(
                "keepfs: error: {what} {uid}: {} damaged block(s); {uid} and every version sharing them are marked invalid",
                r.bad.len()
            );
            damaged += 1;
        }
    }
    if cli_output::json() {
        report!("{}", to_json(&serde_json::json!({ "versions": results, "damaged_versions": damaged }))?);
    }
    Ok(if damaged > 0 { exit::DATA_DAMAGED } else { exit::OK })
}

/// An expiry date, from year 0 to 9999: what the catalog stores as text and reads back.
fn parse_expire(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    use chrono::Datelike;
    let d = keepfs::filter::parse_date(s).map_err(|e| Error::Invalid(format!("expiry date: {e}")))?;
    if !(0..=9999).contains(&d.year()) {
        return Err(Error::Invalid(format!(
            "expiry date '{s}' is outside the years 0 to 9999 that keepfs keeps; to keep a version for good, protect it (`keepfs protect UID`)"
        )));
    }
    Ok(d)
}

/// Parses uids given on the command line, each once in the order first given (`rm V1
/// V1` removes one version and says so once; an export names it once).
fn parse_uids(uids: &[String]) -> Result<Vec<VersionUid>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for u in uids {
        let uid = VersionUid::parse(u)?;
        if seen.insert(uid) {
            out.push(uid);
        }
    }
    Ok(out)
}

/// Parses uids and checks that every one exists before a command changes any of them
/// (`protect A B` with B unknown must not protect A and then fail).
fn existing_uids(repo: &Repository, uids: &[String]) -> Result<Vec<VersionUid>> {
    let uids = parse_uids(uids)?;
    for &uid in &uids {
        repo.version(uid)?;
    }
    Ok(uids)
}

fn labels_text(v: &Version) -> String {
    v.labels
        .iter()
        .map(|(k, val)| if val.is_empty() { k.clone() } else { format!("{k}={val}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// How tables show a date and time (UTC).
fn when(d: &chrono::DateTime<chrono::Utc>) -> String {
    d.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A plain table: a header line, then one line per row, columns padded to their widest cell.
fn print_rows(header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    if cli_output::machine() {
        return cli_output::print_machine(header, &rows);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", parts.join("  ").trim_end())
    };
    if !cli_output::skip_header() {
        line(header.to_vec())?;
    }
    for r in &rows {
        line(r.iter().map(|s| s.as_str()).collect())?;
    }
    Ok(())
}

fn print_table(versions: &[Version]) -> Result<()> {
    let header = [
        "uid",
        "date (UTC)",
        "name",
        "snapshot",
        "size",
        "block_size",
        "status",
        "protected",
        "storage",
        "expire (UTC)",
        "labels",
    ];
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.uid.to_string(),
                when(&v.date),
                v.name.clone(),
                v.snapshot.clone(),
                v.size.to_string(),
                v.block_size.to_string(),
                v.status.as_str().to_string(),
                if v.protected { "yes" } else { "no" }.to_string(),
                v.storage.clone(),
                v.expire.as_ref().map(when).unwrap_or_default(),
                labels_text(v),
            ]
        })
        .collect();
    print_rows(&header, rows)
}

fn run(cli: Cli) -> Result<i32> {
    // A key file is made without a repository.
    if let Command::Key { action: KeyAction::New { file } } = &cli.command {
        let id = keepfs::keys::write_new_key_file(file)?;
        note!("wrote key {id} to {}; keep a copy somewhere safe", file.display());
        return Ok(exit::OK);
    }
    // Completions and man pages come from the command definitions alone.
    match &cli.command {
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cli_command(), "keepfs", &mut script);
            out!("{}", String::from_utf8_lossy(&script).trim_end())?;
            return Ok(exit::OK);
        }
        Command::Man { dir } => {
            let n = write_man_pages(dir)?;
            note!("wrote {n} man pages to {}", dir.display());
            return Ok(exit::OK);
        }
        _ => {}
    }
    let config = Config::discover(cli.config.as_deref())?;
    if let Command::Config { action: ConfigAction::Check } = &cli.command {
        print_config(&config)?;
        return Ok(exit::OK);
    }
    // Before the repository opens it: a damaged database may fail to open at all.
    if let Command::Database { action: DatabaseAction::Rebuild { replace_damaged: true } } = &cli.command
        && config.database_url.is_none()
        && let Some((aside, reason)) = keepfs::catalog::set_aside_if_damaged(&config.database)?
    {
        note!(
            "keepfs: the metadata database {} is damaged ({reason}); moved it to {}",
            config.database.display(),
            aside.display()
        );
    }
    // A catalog migrate moved elsewhere refuses to be used, except to be copied again
    // (the new one lost): migrate is how to get it back. Where no repository exists,
    // a command that does not make one creates nothing (`where_absent`).
    let repo = match &cli.command {
        _ if !Repository::exists(&config) => match where_absent(&cli.command, &config) {
            Absent::Create => Repository::open(config)?,
            Absent::Read => {
                note!(
                    "keepfs: {}; `keepfs config check` shows the configuration used, and if its storage holds backups whose catalog was lost, `keepfs database rebuild` makes it again",
                    no_repository(&config)
                );
                Repository::absent(config)?
            }
            Absent::NamesVersions => {
                // Said with the error ("version … does not exist"), in one line.
                let _ = NO_REPOSITORY.set(config.home.display().to_string());
                Repository::absent(config)?
            }
            Absent::Refuse(why) => return Err(Error::Invalid(why)),
            Absent::NothingToDo => {
                // A storage named with -S must still be one of the configuration's.
                if let Command::Cleanup { storage: Some(name), .. } = &cli.command
                    && !config.storages.iter().any(|s| &s.name == name)
                {
                    return Err(Error::Invalid(format!(
                        "no storage named '{name}' is configured (configured: {}); check the configuration",
                        config.storages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
                if let Command::Cleanup { dry_run, .. } = &cli.command
                    && cli_output::json()
                {
                    report!(
                        "{}",
                        cli_output::to_json(&serde_json::json!({
                            "dry_run": dry_run, "storages": [], "database_bytes_returned": 0,
                        }))?
                    );
                }
                note!(
                    "keepfs: {}: nothing to do; `keepfs config check` shows the configuration used, and if its storage holds backups whose catalog was lost, `keepfs database rebuild` makes it again",
                    no_repository(&config)
                );
                return Ok(exit::OK);
            }
        },
        Command::Database { action: DatabaseAction::Migrate { .. } } => Repository::open_moved(config)?,
        _ => Repository::open(config)?,
    };
    match cli.command {
        Command::Backup {
            source,
            name,
            snapshot,
            labels,
            block_size,
            storage,
            expire,
            continue_uid,
            hints,
            base,
            hints_check,
            diff_from,
            whole_object,
            auto_tags,
            ..
        } => {
            let hints = hints
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .map_err(|e| Error::Invalid(format!("cannot read hints file {}: {e}", f.display())))
                })
                .transpose()?;
            let base = base.as_deref().map(VersionUid::parse).transpose()?;
            let continue_uid = continue_uid.as_deref().map(VersionUid::parse).transpose()?;
            let expire = expire.as_deref().map(parse_expire).transpose()?;
            let url = Url::parse(&source).map_err(Error::Invalid)?;
            let snapshot = match (&url, snapshot) {
                (_, Some(s)) => s,
                (Url::Rbd(spec), None) => spec.snap.clone().unwrap_or_default(),
                (_, None) => String::new(),
            };
            let block_size = match block_size {
                Some(b) => Some(check_block_size(parse_size(&b).map_err(Error::Invalid)?).map_err(Error::Invalid)?),
                None => None,
            };
            let mut label_map = BTreeMap::new();
            for l in &labels {
                let (k, v) = parse_label(l)?;
                label_map.insert(k, v);
            }
            let opts = BackupOptions {
                name,
                snapshot,
                labels: label_map,
                block_size,
                storage,
                expire,
                continue_uid,
                hints,
                base,
                hints_check_percent: Some(hints_check),
                diff_from,
                whole_object,
                auto_tags,
            };
            let p = progress(format!("backing up {}", opts.name));
            let v = repo.backup(&url, &opts, &p)?;
            let s = &v.stats;
            let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
            note!(
                "backed up {} as {}: {} in {secs:.2}s ({:.0} MB/s), {} read, {} new ({} stored), {} deduplicated, {} sparse",
                url,
                v.uid,
                format_size(v.size),
                v.size as f64 / secs / 1e6,
                format_size(s.bytes_read),
                format_size(s.bytes_written),
                format_size(s.bytes_stored),
                format_size(s.bytes_deduplicated),
                format_size(s.bytes_sparse)
            );
            // Another catalog writing to this storage (a host with a database of its own)
            // shows as version objects this catalog does not know: say so now, not only
            // when a cleanup refuses. A failure to look is not the backup's failure.
            match repo.unknown_versions(&v.storage) {
                Ok(unknown) if !unknown.is_empty() => {
                    let shown: Vec<String> = unknown.iter().take(5).map(|u| u.to_string()).collect();
                    note!(
                        "keepfs: warning: storage '{}' holds {} version(s) this catalog does not know ({}{}): another host with a catalog of its own writes here? Share one catalog (database = \"postgresql://…\", docs/scale-out.md) or take them in with `keepfs metadata restore`; cleanup refuses until then",
                        v.storage,
                        unknown.len(),
                        shown.join(", "),
                        if unknown.len() > shown.len() { ", …" } else { "" }
                    );
                }
                Ok(_) => {}
                Err(e) => note!("keepfs: warning: could not list the storage's versions: {e}"),
            }
            if cli_output::json() {
                report!("{}", to_json(&v)?);
            } else {
                report!("{}", v.uid);
            }
            Ok(exit::OK)
        }
        Command::Restore { uid, target, force, sparse, resume, in_place, delta_from, delta_check, .. } => {
            let uid = VersionUid::parse(&uid)?;
            if target == "-" {
                return Err(Error::Invalid(
                    "restore target '-': keepfs writes blocks at their offsets and cannot write to standard output; name a file or block device, or read the version through `keepfs mount` (by_version/UID/data)".into(),
                ));
            }
            let url = Url::parse(&target).map_err(Error::Invalid)?;
            let p = progress(format!("restoring {uid}"));
            if let Some(from) = delta_from {
                let from = VersionUid::parse(&from)?;
                let opts = keepfs::delta::DeltaOptions { check_percent: delta_check };
                let started = Instant::now();
                let r = repo.restore_delta(from, uid, &url, &opts, &p)?;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                for b in &r.bad_blocks {
                    report_damaged("", b);
                }
                note!(
                    "updated {url} from {from} to {uid}: wrote {} of {} block(s), {} in {secs:.2}s; {} unchanged block(s) checked{}",
                    r.blocks_written,
                    r.blocks,
                    format_size(r.bytes_written),
                    r.blocks_checked,
                    if r.resized { format!("; resized to {}", format_size(r.bytes)) } else { String::new() }
                );
                if cli_output::json() {
                    let mut j = serde_json::to_value(&r).map_err(|e| Error::Other(e.to_string()))?;
                    j["uid"] = uid.to_string().into();
                    j["from"] = from.to_string().into();
                    j["target"] = url.to_string().into();
                    j["seconds"] = secs.into();
                    j["damaged_blocks"] = cli_output::bad_blocks_json(&r.bad_blocks);
                    report!("{}", to_json(&j)?);
                }
                if !r.bad_blocks.is_empty() {
                    note!(
                        "keepfs: error: {} damaged block(s) written as zeros; {uid} is now marked invalid",
                        r.bad_blocks.len()
                    );
                    return Ok(exit::DATA_DAMAGED);
                }
                return Ok(exit::OK);
            }
            let started = Instant::now();
            let report = repo.restore(uid, &url, &RestoreOptions { force, sparse, resume, in_place }, &p)?;
            let secs = started.elapsed().as_secs_f64().max(0.001);
            if cli_output::json() {
                report!(
                    "{}",
                    to_json(&serde_json::json!({
                        "uid": uid.to_string(), "target": url.to_string(), "bytes": report.bytes, "seconds": secs,
                        "blocks_kept": report.blocks_kept, "damaged_blocks": cli_output::bad_blocks_json(&report.bad_blocks),
                    }))?
                );
            }
            if report.bad_blocks.is_empty() {
                let kept =
                    if resume { format!(", {} block(s) already there", report.blocks_kept) } else { String::new() };
                note!(
                    "restored {uid} to {url}: {} in {secs:.2}s ({:.0} MB/s){kept}",
                    format_size(report.bytes),
                    report.bytes as f64 / secs / 1e6
                );
                Ok(exit::OK)
            } else {
                for b in &report.bad_blocks {
                    report_damaged("", b);
                }
                note!(
                    "keepfs: error: restored {uid} to {url} with {} damaged block(s) written as zeros; {uid} is now marked invalid",
                    report.bad_blocks.len()
                );
                Ok(exit::DATA_DAMAGED)
            }
        }
        Command::RbdBackup { image, all, prefix, keep_snapshots, storage } => rbd_backup(
            &repo,
            image.as_deref(),
            all.as_deref(),
            keepfs::rbd::RoutineOptions { prefix, keep_snapshots, storage, labels: BTreeMap::new() },
        ),
        Command::Ls { filter, format, expired } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let mut versions = repo.list(filter.as_ref())?;
            if expired {
                let now = chrono::Utc::now();
                versions.retain(|v| v.expire.is_some_and(|e| e < now));
            }
            match format {
                Format::Table => print_table(&versions)?,
                Format::Json => out!("{}", to_json(&versions)?)?,
            }
            Ok(exit::OK)
        }
        Command::Rm { uids, force, dry_run, .. } => {
            let uids = existing_uids(&repo, &uids)?;
            let plan = repo.plan_remove(&uids, force)?;
            if cli_output::json() {
                if !dry_run {
                    repo.apply_remove(&plan)?;
                }
                let versions: Vec<serde_json::Value> = plan.iter().map(cli_output::version_brief).collect();
                report!("{}", to_json(&serde_json::json!({ "dry_run": dry_run, "removed": versions }))?);
                return Ok(exit::OK);
            }
            for v in &plan {
                let line = format!("{} {} ({}, {})", v.uid, v.name, when(&v.date), format_size(v.size));
                // A dry run's list is its result; a removal goes on whatever becomes of its list.
                if dry_run {
                    out!("would remove {line}")?;
                } else {
                    report!("removing {line}");
                }
            }
            if !dry_run {
                repo.apply_remove(&plan)?;
                note!("removed {} version(s); run `keepfs cleanup` to free their blocks", plan.len());
            }
            Ok(exit::OK)
        }
        Command::Scrub { uid, percent, .. } => {
            scrub_versions(&repo, &[VersionUid::parse(&uid)?], &ScrubOptions { deep: false, percent, source: None })
        }
        Command::DeepScrub { uid, percent, source, .. } => {
            let source = source.as_deref().map(|s| Url::parse(s).map_err(Error::Invalid)).transpose()?;
            scrub_versions(&repo, &[VersionUid::parse(&uid)?], &ScrubOptions { deep: true, percent, source })
        }
        Command::BatchScrub { filter, percent, .. } => batch_scrub(&repo, filter.as_deref(), percent, false),
        Command::BatchDeepScrub { filter, percent, .. } => batch_scrub(&repo, filter.as_deref(), percent, true),
        Command::Enforce { rules, filter, dry_run, .. } => {
            let rules = keepfs::retention::parse_rules(&rules)?;
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let versions = repo.list(filter.as_ref())?;
            let doomed = keepfs::retention::plan(&rules, &versions, chrono::Utc::now());
            // One loop for both outputs: a line per version as it goes, or one JSON object.
            let json = cli_output::json();
            let (mut removed, mut kept) = (Vec::new(), Vec::new());
            for uid in doomed {
                let Some(v) = versions.iter().find(|v| v.uid == uid) else { continue };
                let line = |verb: &str| format!("{verb} {uid} {} ({})", v.name, when(&v.date));
                // The rules decide about age; locks (a restore, a mount) still win, and a
                // dry run checks them too: it says what the real run would do.
                let planned = repo.plan_remove(&[uid], true);
                let done = match planned {
                    Ok(plan) if !dry_run => repo.apply_remove(&plan),
                    other => other.map(|_| ()),
                };
                match done {
                    Ok(()) if json => removed.push(cli_output::version_brief(v)),
                    Ok(()) if dry_run => out!("{}", line("would remove"))?,
                    Ok(()) => report!("{}", line("removed")),
                    Err(e) => {
                        note!("keepfs: warning: {} {uid}: {e}", if dry_run { "would keep" } else { "kept" });
                        kept.push(serde_json::json!({ "uid": uid.to_string(), "reason": e.to_string() }));
                    }
                }
            }
            if json {
                report!("{}", to_json(&serde_json::json!({ "dry_run": dry_run, "removed": removed, "kept": kept }))?);
            }
            Ok(if kept.is_empty() { exit::OK } else { exit::REFUSED })
        }
        Command::Init { encrypt, storage } => {
            let name = storage.unwrap_or_else(|| repo.config.default_storage.clone());
            let sc = repo.config.storage(&name)?.clone();
            if !encrypt {
                repo.storage(&name)?;
                note!("storage '{name}' is ready ({})", repo.config.origin);
                return Ok(exit::OK);
            }
            let source = match keepfs::keys::key_source(&sc, "")? {
                Some(s) => s,
                None => keepfs::keys::new_key_source(None, None)?,
            };
            let id = repo.init_encryption(&name, &source)?;
            note!(
                "storage '{name}' is encrypted with key {id} ({}); keep that key safe: without it nothing can be restored",
                source.describe()
            );
            Ok(exit::OK)
        }
        Command::Storage { action } => {
            let infos = repo.storage_infos()?;
            match action {
                StorageAction::List { format: Format::Json } => out!("{}", to_json(&infos)?)?,
                StorageAction::List { format: Format::Table } => print_rows(
                    &["name", "kind", "default", "encrypted", "versions", "location"],
                    infos
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                i.kind.clone(),
                                yes_no(i.default),
                                yes_no(i.encrypted),
                                i.versions.to_string(),
                                i.location.clone(),
                            ]
                        })
                        .collect(),
                )?,
                StorageAction::Stats { name, format } => {
                    repo.config.storage(&name)?;
                    let Some(i) = infos.into_iter().find(|i| i.name == name) else {
                        return Err(Error::Invalid(format!("no storage named '{name}'")));
                    };
                    match format {
                        Format::Json => out!("{}", to_json(&i)?)?,
                        Format::Table => {
                            let ratio = if i.stored_bytes > 0 {
                                format!("{:.2}", i.image_bytes as f64 / i.stored_bytes as f64)
                            } else {
                                "-".into()
                            };
                            print_rows(
                                &["storage", "versions", "objects", "stored", "images", "images/stored"],
                                vec![vec![
                                    i.name.clone(),
                                    i.versions.to_string(),
                                    i.objects.to_string(),
                                    cli_output::size_cell(i.stored_bytes),
                                    cli_output::size_cell(i.image_bytes),
                                    ratio,
                                ]],
                            )?
                        }
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Key { action } => {
            let storage_name = |s: Option<String>| s.unwrap_or_else(|| repo.config.default_storage.clone());
            match action {
                KeyAction::New { .. } => unreachable!("handled before the repository is opened"),
                KeyAction::List { storage, format } => {
                    let (keys, unrecorded) = repo.list_keys(&storage_name(storage))?;
                    if unrecorded > 0 {
                        note!(
                            "keepfs: {unrecorded} object(s) have no key recorded (a rebuilt database); `keepfs key rekey` records them"
                        );
                    }
                    match format {
                        Format::Json => out!("{}", to_json(&keys)?)?,
                        Format::Table => print_rows(
                            &["id", "created (UTC)", "kind", "current", "objects"],
                            keys.iter()
                                .map(|k| {
                                    vec![
                                        k.id.clone(),
                                        when(&k.created),
                                        k.kind.clone(),
                                        yes_no(k.current),
                                        k.objects.to_string(),
                                    ]
                                })
                                .collect(),
                        )?,
                    }
                }
                KeyAction::Rotate { storage, new_key_file, new_passphrase_file } => {
                    let name = storage_name(storage);
                    let new = keepfs::keys::new_key_source(new_key_file.as_deref(), new_passphrase_file.as_deref())?;
                    let id = repo.rotate_key(&name, &new)?;
                    note!(
                        "storage '{name}': key {id} is current; run `keepfs key rekey` to move existing objects to it"
                    );
                }
                KeyAction::Rekey { storage } => {
                    let name = storage_name(storage);
                    let (done, already, gone) = repo.rekey(&name)?;
                    note!("storage '{name}': rewrapped {done} object(s); {already} had the current key already");
                    if gone > 0 {
                        note!(
                            "storage '{name}': {gone} listed object(s) were gone or being removed when their turn came (by a cleanup or `rm`), or are missing (`keepfs deep-scrub` finds those); `key remove` refuses while any of them still needs an older key: run `keepfs key rekey` again then"
                        );
                    }
                }
                KeyAction::Remove { id, storage } => {
                    let name = storage_name(storage);
                    let kid = keepfs::transform::aes::KeyId::from_hex(id.trim()).ok_or_else(|| {
                        Error::Invalid(format!("'{id}' is not a key id (16 hex digits, see `keepfs key list`)"))
                    })?;
                    repo.remove_key(&name, kid)?;
                    note!("storage '{name}': key {kid} removed");
                }
            }
            Ok(exit::OK)
        }
        Command::Due { name, schedulers, format } => {
            let chosen = keepfs::schedule::select(&repo.config.schedulers, &schedulers)?;
            let rows = keepfs::schedule::due(&chosen, &repo.list(None)?, name.as_deref(), chrono::Utc::now());
            match format {
                Format::Json => out!("{}", to_json(&rows)?)?,
                Format::Table => print_rows(
                    &["name", "schedulers", "expire_date (UTC)", "due_since (UTC)"],
                    rows.iter()
                        .map(|r| vec![r.name.clone(), r.schedulers.join(","), when(&r.expire_date), when(&r.due_since)])
                        .collect(),
                )?,
            }
            Ok(exit::OK)
        }
        Command::Sla { name, schedulers, format } => {
            let chosen = keepfs::schedule::select(&repo.config.schedulers, &schedulers)?;
            let rows = keepfs::schedule::sla(&chosen, &repo.list(None)?, name.as_deref(), chrono::Utc::now());
            match format {
                Format::Json => out!("{}", to_json(&rows)?)?,
                Format::Table => print_rows(
                    &["name", "breach"],
                    rows.iter().map(|r| vec![r.name.clone(), r.breach.clone()]).collect(),
                )?,
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Export { mut args } } => {
            // `metadata export V1 V2 out.json`: the last word is the file.
            let file = PathBuf::from(args.pop().unwrap_or_default());
            let uids = args;
            let uids = parse_uids(&uids)?;
            if file.as_os_str() == "-" {
                let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                repo.export_metadata_to(&uids, &mut w, output::STDOUT)?;
            } else {
                // Written beside its place and renamed there once complete and durable: a
                // failed export leaves no file that looks whole.
                let what = format!("cannot write {}", file.display());
                let dir = match file.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                // Made as a plain file is (0666 less the umask), not private as temporary
                // files are.
                use std::os::unix::fs::PermissionsExt;
                if !dir.is_dir() {
                    return Err(Error::Invalid(format!("{what}: directory {} does not exist", dir.display())));
                }
                // (The error names what went wrong, not the temporary file's name.)
                let tmp = tempfile::Builder::new()
                    .permissions(std::fs::Permissions::from_mode(0o666))
                    .tempfile_in(&dir)
                    .map_err(|e| Error::io(&what, std::io::Error::from(e.kind())))?;
                let mut w = std::io::BufWriter::new(tmp);
                repo.export_metadata_to(&uids, &mut w, &what)?;
                let tmp = w.into_inner().map_err(|e| Error::io(&what, e.into_error()))?;
                tmp.as_file().sync_all().map_err(|e| Error::io(&what, e))?;
                tmp.persist(&file).map_err(|e| Error::io(&what, e.error))?;
                std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&what, e))?;
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Import { file } } => {
            // Each version's index waits in an unnamed spool file until the whole
            // document was checked: one descriptor a version.
            more_open_files();
            // Read as a stream: a document of a 200 TB dense version is never held.
            let doc: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin().lock()))
            } else {
                let f =
                    std::fs::File::open(&file).map_err(|e| Error::io(format!("cannot read {}", file.display()), e))?;
                Box::new(std::io::BufReader::new(f))
            };
            for uid in repo.import_metadata(doc)? {
                report!("{uid}");
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Backup { filter } } => {
            let n = repo.backup_metadata(&committed_uids(&repo, filter.as_deref())?)?;
            note!("wrote the metadata of {n} version(s) to their storages");
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Restore { uids, force } } => {
            more_open_files();
            for uid in repo.restore_metadata(&parse_uids(&uids)?, force)? {
                report!("{uid}");
            }
            Ok(exit::OK)
        }
        Command::Database { action: DatabaseAction::Rebuild { .. } } => {
            let r = repo.rebuild_database()?;
            let already = if r.already > 0 { format!(" ({} there already)", r.already) } else { String::new() };
            note!(
                "rebuilt {}: {} version(s){already}, {} object(s)",
                repo.config.catalog_location().display(),
                r.versions,
                r.objects
            );
            if r.damaged.is_empty() {
                return Ok(exit::OK);
            }
            for d in &r.damaged {
                note!("keepfs: damaged: storage '{}' object {}: {}", d.storage, d.key, d.reason);
            }
            let names: Vec<&str> = r.damaged.iter().map(|d| d.key.trim_start_matches("versions/")).collect();
            let filter = names.iter().map(|u| format!("uid == \"{u}\"")).collect::<Vec<_>>().join(" or ");
            note!(
                "keepfs: error: skipped {} damaged version object(s) ({}); everything else is rebuilt. To recover them, run `keepfs metadata backup '{filter}'` with a database that still holds them (an older copy, named in a --config), then `keepfs database rebuild` again",
                r.damaged.len(),
                names.join(", ")
            );
            Ok(exit::DATA_DAMAGED)
        }
        Command::Database { action: DatabaseAction::Migrate { to } } => {
            let (to, r) = repo.migrate_catalog(&to)?;
            note!(
                "copied the catalog into {}: {} version(s), {} index(es), {} object(s) of {} storage(s); checked. Set `database` in the configuration to it: the old catalog now refuses to be used",
                to.display(),
                r.versions,
                r.indexes,
                r.objects,
                r.storages
            );
            Ok(exit::OK)
        }
        Command::Database { action: DatabaseAction::Sessions { format } } => {
            let sessions = repo.live_sessions()?;
            cli_output::print_sessions(&sessions, format)?;
            Ok(exit::OK)
        }
        Command::Label { uid, changes } => {
            repo.change_labels(VersionUid::parse(&uid)?, &changes)?;
            Ok(exit::OK)
        }
        Command::Expire { uid, date } => {
            let date = if date.trim().is_empty() { None } else { Some(parse_expire(&date)?) };
            repo.set_expire(VersionUid::parse(&uid)?, date)?;
            Ok(exit::OK)
        }
        Command::Protect { uids } => {
            for uid in existing_uids(&repo, &uids)? {
                repo.set_protected(uid, true)?;
            }
            Ok(exit::OK)
        }
        Command::Unprotect { uids } => {
            for uid in existing_uids(&repo, &uids)? {
                repo.set_protected(uid, false)?;
            }
            Ok(exit::OK)
        }
        Command::Mount {
            mountpoint,
            read_only,
            discard_writes,
            daemon,
            threads,
            page_cache,
            allow_other,
            uid,
            gid,
            mode,
            metrics,
        } => {
            if daemon {
                return mount_daemon(&mountpoint, &repo.config.home.join("mount.log"));
            }
            prepare_mountpoint(&mountpoint)?;
            few_malloc_arenas();
            let config_block_size = repo.config.block_size;
            // Before any thread exists, so that every thread has the signals blocked.
            unmount_on_signal(&mountpoint);
            serve_metrics(metrics.as_deref(), &repo.config)?;
            let opts = keepfs_fs::MountOptions {
                read_only,
                threads,
                page_cache,
                allow_other,
                uid,
                gid,
                mode,
                ..Default::default()
            };
            // --discard-writes keeps overlays for the life of the mount (a VM may reopen).
            let sessions = session_service(repo, read_only, discard_writes, Overlays::KeepUntilShutdown, opts.ttl)?;
            let shown = mountpoint.display().to_string();
            let read_ahead_kb = (config_block_size / 1024).max(1024);
            let at = mountpoint.clone();
            keepfs_fs::mount(sessions, &mountpoint, opts, move || {
                raise_read_ahead(&at, read_ahead_kb);
                note!("keepfs: mounted at {shown}; unmount with `fusermount3 -u {shown}`")
            })
            .map_err(|e| Error::io(format!("cannot mount at {}", mountpoint.display()), e))?;
            Ok(exit::OK)
        }
        Command::Completion { .. } | Command::Man { .. } | Command::Config { .. } => Ok(exit::OK),
        Command::StorageUsage { filter, format } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let usage = keepfs::usage::storage_usage(&repo, &repo.list(filter.as_ref())?)?;
            match format {
                Format::Json => out!("{}", to_json(&usage)?)?,
                Format::Table => {
                    let header = ["uid", "name", "storage", "size", "sparse", "shared", "exclusive", "stored", "frees"];
                    let mut rows: Vec<Vec<String>> = usage
                        .iter()
                        .map(|u| {
                            vec![
                                u.uid.clone(),
                                u.name.clone(),
                                u.storage.clone(),
                                cli_output::size_cell(u.size),
                                cli_output::size_cell(u.sparse),
                                cli_output::size_cell(u.shared),
                                cli_output::size_cell(u.exclusive),
                                cli_output::size_cell(u.stored),
                                cli_output::size_cell(u.exclusive_stored),
                            ]
                        })
                        .collect();
                    let sum = |f: fn(&keepfs::usage::Usage) -> u64| cli_output::size_cell(usage.iter().map(f).sum());
                    rows.push(vec![
                        "total".into(),
                        String::new(),
                        String::new(),
                        sum(|u| u.size),
                        sum(|u| u.sparse),
                        sum(|u| u.shared),
                        sum(|u| u.exclusive),
                        String::new(),
                        sum(|u| u.exclusive_stored),
                    ]);
                    print_rows(&header, rows)?;
                }
            }
            Ok(exit::OK)
        }
        Command::Stats { filter, format } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let versions = repo.list(filter.as_ref())?;
            // Image bytes per second: what the backup covered, holes included. None for a
            // version without a finished backup's figures (incomplete, or taken in by
            // `metadata import`): its size over no time is no rate.
            let rate = |v: &Version| {
                (v.stats.duration_ms > 0 && v.status != keepfs::version::Status::Incomplete)
                    .then(|| (v.size as f64 / (v.stats.duration_ms as f64 / 1000.0)) as u64)
            };
            match format {
                Format::Json => {
                    let rows: Vec<serde_json::Value> = versions
                        .iter()
                        .map(|v| {
                            serde_json::json!({
                                "uid": v.uid.to_string(), "name": v.name, "date": v.date, "size": v.size,
                                "status": v.status.as_str(), "stats": v.stats, "bytes_per_second": rate(v),
                            })
                        })
                        .collect();
                    out!("{}", to_json(&rows)?)?;
                }
                Format::Table => {
                    let header = [
                        "uid",
                        "name",
                        "date (UTC)",
                        "size",
                        "read",
                        "written",
                        "stored",
                        "deduplicated",
                        "sparse",
                        "seconds",
                        "MB/s",
                    ];
                    let rows = versions
                        .iter()
                        .map(|v| {
                            let s = &v.stats;
                            vec![
                                v.uid.to_string(),
                                v.name.clone(),
                                when(&v.date),
                                cli_output::size_cell(v.size),
                                cli_output::size_cell(s.bytes_read),
                                cli_output::size_cell(s.bytes_written),
                                cli_output::size_cell(s.bytes_stored),
                                cli_output::size_cell(s.bytes_deduplicated),
                                cli_output::size_cell(s.bytes_sparse),
                                format!("{:.1}", s.duration_ms as f64 / 1000.0),
                                rate(v).map_or_else(|| "-".to_string(), |r| format!("{:.0}", r as f64 / 1e6)),
                            ]
                        })
                        .collect();
                    print_rows(&header, rows)?;
                }
            }
            Ok(exit::OK)
        }
        Command::Diff { old, new, format } => {
            let (old, new) = (VersionUid::parse(&old)?, VersionUid::parse(&new)?);
            let changes = repo.diff(old, new)?;
            match format {
                Format::Json => out!("{}", serde_json::to_string(&changes).map_err(|e| Error::Other(e.to_string()))?)?,
                Format::Table => {
                    let rows = changes
                        .iter()
                        .map(|c| {
                            vec![
                                c.offset.to_string(),
                                c.length.to_string(),
                                if c.exists { "data" } else { "zero" }.to_string(),
                            ]
                        })
                        .collect();
                    print_rows(&["offset", "length", "now"], rows)?;
                    let total: u64 = changes.iter().map(|c| c.length).sum();
                    note!("{} range(s), {} changed from {old} to {new}", changes.len(), format_size(total));
                }
            }
            Ok(exit::OK)
        }
        Command::Nbd { listen, socket, read_only, discard_writes, tls_cert, tls_key, metrics } => {
            few_malloc_arenas();
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(
                    keepfs_nbd::tls_config(cert, key)
                        .map_err(|e| Error::Invalid(format!("cannot use the TLS certificate and key: {e}")))?,
                ),
                _ => None,
            };
            let listener = match &socket {
                Some(path) => keepfs_nbd::Listener::unix(path.clone())
                    .map_err(|e| listen_error(&path.display().to_string(), e))?,
                None => keepfs_nbd::Listener::tcp(&listen).map_err(|e| listen_error(&listen, e))?,
            };
            // Before any thread exists (the session service starts readers), so that
            // every thread has the signals blocked.
            stop_on_signal(listener.stopper());
            // --discard-writes drops a connection's writes when it disconnects.
            let ttl = keepfs::session::SessionOptions::default().list_ttl;
            let config_for_metrics = repo.config.clone();
            let sessions = session_service(repo, read_only, discard_writes, Overlays::DropAtLastClose, ttl)?;
            note!("keepfs: serving NBD on {} (exports: version uids and NAME@latest)", listener.describe());
            serve_metrics(metrics.as_deref(), &config_for_metrics)?;
            keepfs_nbd::serve(sessions, listener, keepfs_nbd::NbdOptions { read_only, tls })
                .map_err(|e| Error::io("the NBD server stopped", e))?;
            Ok(exit::OK)
        }
        Command::Bench { storages, size, seconds, cpu_only, format } => {
            if !(seconds > 0.0 && seconds <= 600.0) {
                return Err(Error::Invalid(format!("--seconds {seconds}: give a duration from 0 to 600 seconds")));
            }
            let opts = keepfs::bench::BenchOptions {
                duration: std::time::Duration::from_secs_f64(seconds),
                storage_bytes: parse_size(&size).map_err(Error::Invalid)?,
                storages,
                cpu_only,
            };
            title::set("keepfs [benchmarking]");
            let rows = keepfs::bench::run(&repo, &opts);
            title::reset();
            cli_output::print_bench(&rows?, format)?;
            Ok(exit::OK)
        }
        Command::Cleanup { dry_run, storage, .. } => {
            let names: Vec<String> = match storage {
                Some(s) => vec![s],
                None => repo.config.storages.iter().map(|s| s.name.clone()).collect(),
            };
            // One loop for both outputs: lines for people as it goes (what a dry run
            // would do is a result, on stdout; what a cleanup did is a report), or one
            // JSON object at the end.
            let json = cli_output::json();
            let say = |line: String| -> Result<()> {
                match (json, dry_run) {
                    (true, _) => {}
                    (false, true) => out!("{line}")?,
                    (false, false) => report!("{line}"),
                }
                Ok(())
            };
            let mut storages = Vec::new();
            for name in names {
                title::set(&format!("keepfs [cleaning up storage {name}]"));
                // A storage too large for `cleanup_memory` is planned and cleaned up a
                // slice of its ids at a time; the report adds the slices up.
                let slices = repo.cleanup_slices(&name)?;
                if slices > 1 {
                    say(format!(
                        "storage {name}: cleaning up in {slices} slices to stay within cleanup_memory ({}); each slice reads every index again",
                        format_size(repo.config.cleanup_memory_bytes)
                    ))?;
                }
                // Claimed before the plan: a second cleanup is refused before it reads
                // every index and lists the storage, and before it says what it would do.
                let claim = if dry_run { None } else { Some(repo.claim_cleanup(&name)?) };
                let mut j = serde_json::json!({"storage": name, "slices": slices});
                let sum = |j: &mut serde_json::Value, key: &str, n: u64| {
                    let had = j[key].as_u64().unwrap_or(0);
                    j[key] = (had + n).into();
                };
                for slice in keepfs::slice::Slice::all(slices) {
                    let plan = repo.plan_cleanup_slice(&name, slice)?;
                    let part = if slices > 1 {
                        format!("storage {name} (slice {}/{slices})", slice.index + 1)
                    } else {
                        format!("storage {name}")
                    };
                    if slice.index == 0 {
                        for line in plan.spared_lines() {
                            say(line)?;
                        }
                    }
                    if let Some(line) = plan.unrecorded_line(&part) {
                        say(line)?;
                    }
                    if !plan.unfinished.is_empty() {
                        say(format!(
                            "{part}: {} block(s) of stopped backups were never recorded; their files (if any) go too",
                            plan.unfinished.len()
                        ))?;
                    }
                    let verb = if dry_run { "would delete" } else { "deleting" };
                    say(format!(
                        "{part}: {verb} {} unreferenced object(s) and {} orphaned file(s), {}; {} referenced, {} kept (newer than the oldest running backup)",
                        plan.objects.len(),
                        plan.orphans.len(),
                        format_size(plan.bytes()),
                        plan.referenced,
                        plan.kept_recent
                    ))?;
                    sum(&mut j, "objects", plan.objects.len() as u64);
                    sum(&mut j, "orphans", plan.orphans.len() as u64);
                    sum(&mut j, "bytes", plan.bytes());
                    sum(&mut j, "referenced", plan.referenced);
                    sum(&mut j, "kept_recent", plan.kept_recent);
                    sum(&mut j, "unfinished", plan.unfinished.len() as u64);
                    sum(&mut j, "kept_unrecorded", plan.kept_unrecorded);
                    sum(&mut j, "kept_for_continue", plan.kept_for_continue);
                    if slice.index == 0 {
                        j["spared"] = plan.spared_lines().into();
                    }
                    if dry_run {
                        for (id, size) in &plan.objects {
                            say(format!("  object {id} ({size} bytes)"))?;
                        }
                        for (key, size) in &plan.orphans {
                            say(format!("  orphan {key} ({size} bytes)"))?;
                        }
                    } else if let Some(claim) = &claim {
                        let r = repo.apply_cleanup_claimed(&plan, claim)?;
                        say(format!(
                            "{part}: deleted {} object(s) and {} orphaned file(s), freed {}",
                            r.objects_deleted,
                            r.orphans_deleted,
                            format_size(r.bytes_freed)
                        ))?;
                        sum(&mut j, "objects_deleted", r.objects_deleted);
                        sum(&mut j, "orphans_deleted", r.orphans_deleted);
                        sum(&mut j, "bytes_freed", r.bytes_freed);
                    }
                }
                storages.push(j);
            }
            // The catalog's pages of removed versions go back to the filesystem too.
            let mut database_bytes_returned = 0;
            if !dry_run {
                match repo.reclaim_catalog_space() {
                    Ok(n) => database_bytes_returned = n,
                    Err(e) => note!("keepfs: warning: could not shrink the database file: {e}"),
                }
                if database_bytes_returned > 0 {
                    say(format!("database: returned {} to the filesystem", format_size(database_bytes_returned)))?;
                }
            }
            title::reset();
            if json {
                report!(
                    "{}",
                    to_json(&serde_json::json!({
                        "dry_run": dry_run, "storages": storages, "database_bytes_returned": database_bytes_returned,
                    }))?
                );
            }
            Ok(exit::OK)
        }
    }
}

fn is_mounted(dir: &std::path::Path) -> bool {
    let Ok(canon) = dir.canonicalize() else { return false };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str())))
        .unwrap_or(false)
}

/// Checks the mount point, cleaning up a mount left by a keepfs that was killed.
fn prepare_mountpoint(dir: &std::path::Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if is_mounted(dir) {
                return Err(Error::Refused(format!(
                    "{} is already a mount point; unmount it first (fusermount3 -u {})",
                    dir.display(),
                    dir.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(Error::Invalid(format!("{} is not a directory", dir.display()))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // The FUSE server of an earlier mount died: detach the dead mount.
            let ok = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
                || std::process::Command::new("umount")
                    .arg("-l")
                    .arg(dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if !ok {
                return Err(Error::Other(format!(
                    "{} is a dead keepfs mount and could not be detached; run `fusermount3 -u -z {}` as its owner",
                    dir.display(),
                    dir.display()
                )));
            }
            note!("keepfs: detached the dead mount left at {}", dir.display());
            Ok(())
        }
        Err(e) => Err(Error::io(format!("cannot use mount point {}", dir.display()), e)),
    }
}

/// The kernel offers FUSE filesystems 128 KiB of read-ahead, which leaves sequential
/// readers of `data` waiting on small requests; one block's worth measured 35% faster
/// cold reads. Only root may raise it (sysfs); otherwise the default stays.
/// (The device number comes from mountinfo: a stat of the mount point would wait for
/// the filesystem, which is not serving requests yet.)
fn raise_read_ahead(mountpoint: &std::path::Path, kb: u32) {
    let Ok(canon) = mountpoint.canonicalize() else { return };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let dev =
        info.lines().rev().filter(|l| l.split(' ').nth(4) == Some(target.as_str())).find_map(|l| l.split(' ').nth(2));
    if let Some(dev) = dev {
        let _ = std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), format!("{kb}\n"));
    }
}

/// SIGINT and SIGTERM unmount cleanly (the session then ends and `mount` returns).
fn unmount_on_signal(dir: &std::path::Path) {
    let dir = dir.to_path_buf();
    on_signal(move |sig| {
        note!("keepfs: signal {sig}: unmounting {}", dir.display());
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&dir).status();
    });
}

/// The session service a face (the mount, the NBD server) serves: overlays become
/// versions, or with `discard` meet the face's `discarded` fate.
/// Limits glibc's malloc to two arenas in a long-running face (mount, nbd). By default
/// each thread that allocates gets an arena of its own (up to 8 a core) and each keeps
/// the block buffers freed into it: reading a dense 4 GiB version through a mount grew
/// the process's own memory 46 bytes a block that way, against 8 with two arenas
/// (`contrib/bench/dense_index.py --mount`); the read took no longer (0.96x).
fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator; called before the face's
    // threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Raises the soft limit of open files to the hard one, for a command that holds one
/// spool file per version until all are checked (`metadata import` and `restore` of
/// many versions: the usual soft limit of 1024 is a repository of 1,024 versions). Past
/// the hard limit the command fails with "Too many open files" and records nothing.
fn more_open_files() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the plain struct given; a failure
    // leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The home of a repository that does not exist, when a command named versions in it:
/// its "does not exist" error says so.
static NO_REPOSITORY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What a command does where no repository exists. Only a command that stores
/// something (a backup, a mount, `init`, an import) makes one; the others must leave
/// nothing behind (a mistyped KEEPFS_HOME is seen at once).
enum Absent {
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

fn where_absent(c: &Command, config: &Config) -> Absent {
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
fn no_repository(config: &Config) -> String {
    format!("no repository at {} yet (no catalog {})", config.home.display(), config.catalog_location().display())
}

/// A server's address it cannot listen on: one held by another (a live server, a file
/// that is not a socket) is refused (exit 4), anything else an I/O error.
fn listen_error(at: &str, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AlreadyExists => {
            Error::Refused(format!("cannot listen on {at}: {e}"))
        }
        _ => Error::io(format!("cannot listen on {at}"), e),
    }
}

fn session_service(
    repo: Repository,
    read_only: bool,
    discard: bool,
    discarded: Overlays,
    list_ttl: std::time::Duration,
) -> Result<std::sync::Arc<SessionService>> {
    let overlays = if discard { discarded } else { Overlays::Commit };
    let opts = keepfs::session::SessionOptions { read_only, overlays, list_ttl };
    Ok(std::sync::Arc::new(SessionService::new(std::sync::Arc::new(repo), opts)?))
}

/// An octal file mode for `mount --mode` (read and write bits only).
fn parse_mode(s: &str) -> std::result::Result<u16, String> {
    let m = u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{s}' is not an octal mode (e.g. 0640)"))?;
    if m & !0o666 != 0 {
        return Err(format!(
            "'{s}': give read and write bits only (e.g. 0640); directories get search bits by themselves"
        ));
    }
    Ok(m)
}

/// What `config check` prints: every resolved path and storage, and where each key would
/// come from, but no secret (no key, passphrase or S3 secret, and no access key).
fn print_config(c: &Config) -> Result<()> {
    use keepfs::config::StorageKind;
    out!("configuration: {}", c.origin)?;
    out!("home: {}", c.home.display())?;
    out!("database: {}", c.catalog_location().display())?;
    if let Some(url) = &c.database_url {
        let from = if keepfs::catalog::postgres::url_has_password(url) {
            "in the URL".to_string()
        } else if let Some(f) = &c.database_password_file {
            format!("database_password_file {}", f.display())
        } else {
            "PGPASSFILE or ~/.pgpass, if either has a line for it".to_string()
        };
        out!("database password: {from}")?;
    }
    if let Some(h) = &c.host {
        keepfs::catalog::set_host(h);
    }
    let (host, from) = keepfs::catalog::host_and_origin();
    out!("host: {host} ({from})")?;
    out!("default storage: {}", c.default_storage)?;
    out!(
        "block size: {}; compression level {}; workers {}; storage writers {}; storage readers {}; source readers {}",
        format_size(c.block_size as u64),
        c.compression_level,
        c.workers,
        c.storage_writers,
        c.storage_readers,
        c.source_readers
    )?;
    out!(
        "file mode: {:04o} (directories {:04o}); incomplete grace: {}s",
        c.modes.file,
        c.modes.dir,
        c.incomplete_grace.num_seconds()
    )?;
    let env_key = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(|_| format!("${var}"));
    for s in &c.storages {
        let kind = match &s.kind {
            StorageKind::File { path } => format!("file {}", path.display()),
            StorageKind::Null => "null (discards everything)".into(),
            StorageKind::S3(s3) => format!(
                "s3 {} region {} bucket {} prefix '{}' ({} addressing; credentials {})",
                s3.endpoint,
                s3.region,
                s3.bucket,
                s3.prefix,
                if s3.path_style { "path" } else { "virtual-host" },
                if s3.access_key.is_empty() { "missing" } else { "set" }
            ),
        };
        let key = match (&s.key_file, &s.passphrase_file) {
            (Some(f), _) => format!("key file {}", f.display()),
            (None, Some(f)) => format!("passphrase file {}", f.display()),
            _ => env_key("KEEPFS_KEY_FILE")
                .or_else(|| env_key("KEEPFS_PASSPHRASE"))
                .unwrap_or_else(|| "none (fine for an unencrypted storage)".into()),
        };
        let cache = s
            .read_cache
            .as_ref()
            .map(|r| format!("; read cache {} up to {}", r.dir.display(), format_size(r.max_bytes)));
        out!(
            "storage {}: {kind}; key: {key}; encryption required: {}{}",
            s.name,
            if s.require_encryption { "yes" } else { "no" },
            cache.unwrap_or_default()
        )?;
    }
    let names: Vec<&str> = c.schedulers.iter().map(|s| s.name.as_str()).collect();
    out!("schedulers: {}", names.join(", "))?;
    Ok(())
}

/// Renders `keepfs.1` and `keepfs-<command>.1` (and nested ones) into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    fn render(cmd: clap::Command, name: String, dir: &std::path::Path, n: &mut usize) -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.clone()))
            .render(&mut page)
            .map_err(|e| Error::io(format!("cannot render {}", path.display()), e))?;
        std::fs::write(&path, page).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            render(sub.clone(), format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    let mut n = 0;
    let mut cmd = cli_command();
    cmd.build();
    render(cmd, "keepfs".into(), dir, &mut n)?;
    Ok(n)
}

/// `--pushgateway` / `--metrics-file`: after any command (whatever its outcome), the
/// repository's metrics, gathered from its catalog (keepfs::metrics).
fn emit_metrics((push, file, config): (Option<String>, Option<PathBuf>, Option<PathBuf>)) -> Result<()> {
    if push.is_none() && file.is_none() {
        return Ok(());
    }
    let text = keepfs::metrics::gather(&Config::discover(config.as_deref())?)?;
    if let Some(path) = &file {
        keepfs::metrics::write_file(path, &text)?;
    }
    if let Some(url) = &push {
        keepfs::metrics::push(url, &text)?;
    }
    Ok(())
}

/// `mount --metrics ADDR`, `nbd --metrics ADDR`: /metrics on a thread of its own.
fn serve_metrics(addr: Option<&str>, config: &Config) -> Result<()> {
    if let Some(addr) = addr {
        let at = keepfs::metrics::serve(addr, config.clone())?;
        note!("keepfs: metrics at http://{at}/metrics");
    }
    Ok(())
}

/// On SIGINT or SIGTERM the NBD server stops: no new clients, every connection ends, and
/// what each wrote becomes a version (as at a disconnect) before the process exits.
fn stop_on_signal(stopper: keepfs_nbd::Stopper) {
    on_signal(move |sig| {
        note!("keepfs: signal {sig}: stopping the NBD server");
        stopper.stop();
    });
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after it)
/// and runs `then` on a thread of its own when one arrives. Call it before any thread
/// exists.
fn on_signal(then: impl FnOnce(libc::c_int) + Send + 'static) {
    // SAFETY: signal mask calls on a zeroed, then filled sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits on the signals blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        then(sig);
    });
}

/// Starts the mount in a detached child and returns once it is mounted. The child's
/// messages go to `log` (it must not hold on to the caller's terminal or pipes).
fn mount_daemon(dir: &std::path::Path, log: &std::path::Path) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find the keepfs executable", e))?;
    let args: Vec<String> = mount_options::effective_args().into_iter().skip(1).filter(|a| a != "--daemon").collect();
    let mut cmd = std::process::Command::new(exe);
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("cannot open the mount log {}", log.display()), e))?;
    cmd.args(&args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(logf);
    // SAFETY: setsid in the child before exec detaches it from the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // Mounted is: a file system at `dir` that answers, and not the one there before (a
    // dead mount the child detaches first is listed, but answers ENOTCONN; a live one
    // makes the child fail).
    use std::os::unix::fs::MetadataExt;
    let dev = |d: &std::path::Path| std::fs::metadata(d).map(|m| m.dev()).ok();
    let before = dev(dir);
    let logged_before = std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0);
    let mut child = cmd.spawn().map_err(|e| Error::io("cannot start the mount process", e))?;
    let t = Instant::now();
    while t.elapsed().as_secs() < 30 {
        if let Some(status) = child.try_wait().map_err(|e| Error::io("mount process", e))? {
            // Its own error line and exit code, as the foreground mount gives them (they
            // were only in the log, behind "exited (exit status: 4)").
            let said = std::fs::read(log).ok().and_then(|t| {
                let new = String::from_utf8_lossy(t.get(logged_before..)?).into_owned();
                new.lines().rev().find_map(|l| l.strip_prefix("keepfs: error: ").map(str::to_string))
            });
            if let (Some(reason), Some(code)) = (said, status.code().filter(|c| *c != 0)) {
                note!("keepfs: error: {reason}");
                return Ok(code);
            }
            return Err(Error::Other(format!(
                "the mount process exited ({status}) before mounting {}; see {}",
                dir.display(),
                log.display()
            )));
        }
        if is_mounted(dir) && dev(dir).is_some_and(|d| Some(d) != before) {
            note!("keepfs: mounted at {} (server pid {}, log {})", dir.display(), child.id(), log.display());
            report!("{}", child.id());
            return Ok(exit::OK);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(Error::Other(format!("{} was not mounted within 30 s", dir.display())))
}

/// The command line's definition, with each command's examples (see `help`).
fn cli_command() -> clap::Command {
    help::with_examples(<Cli as clap::CommandFactory>::command())
}

/// `keepfs rbd-backup`: one image, or every image of a pool with a summary (exit 1 when
/// any failed).
fn rbd_backup(
    repo: &Repository,
    image: Option<&str>,
    all: Option<&str>,
    opts: keepfs::rbd::RoutineOptions,
) -> keepfs::Result<i32> {
    let one = |spec: &keepfs::rbd::Spec| -> keepfs::Result<()> {
        let p = progress(format!("backing up {}", spec.image_path()));
        let o = keepfs::rbd::backup_image(repo, spec, &opts, &p)?;
        for w in &o.warnings {
            note!("keepfs: warning: {w}");
        }
        let how = match &o.from {
            Some((snap, uid)) => format!("differential from {snap} ({uid})"),
            None => "initial".to_string(),
        };
        let removed = if o.removed_snapshots.is_empty() {
            String::new()
        } else {
            format!("; removed snapshot(s) {}", o.removed_snapshots.join(", "))
        };
        note!("backed up {}@{} as {}: {how}{removed}", spec.image_path(), o.snapshot, o.version.uid);
        report!("{}", o.version.uid);
        Ok(())
    };
    let Some(pool) = all else {
        let spec = keepfs::rbd::parse_image(image.unwrap_or_default())?;
        one(&spec)?;
        return Ok(exit::OK);
    };
    let images = keepfs::rbd::images_of(pool, repo)?;
    let mut failed = Vec::new();
    for spec in &images {
        if let Err(e) = one(spec) {
            note!("keepfs: error: {}: {e}", spec.image_path());
            failed.push(spec.image_path());
        }
    }
    note!(
        "rbd-backup --all {pool}: {} image(s), {} backed up, {} failed{}",
        images.len(),
        images.len() - failed.len(),
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(": {}", failed.join(", ")) }
    );
    Ok(if failed.is_empty() { exit::OK } else { exit::FAILURE })
}

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
        cli_output::usage_error_json(&e);
        e.exit()
    });
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli_output::set_json(cli_output::wants_json(&matches));
    cli_output::set_table_style(cli.machine_output, cli.skip_header);
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
            if cli_output::json() {
                cli_output::error_json(&e);
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
