//! The command line's definition (clap): the global flags, every command and its
//! arguments, and the parsers of argument values. `--help` examples live in `help`.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use super::help;

#[derive(Parser)]
#[command(name = "keepfs", version, about = "Block-level deduplicating backups of disk images and block devices")]
pub(crate) struct Cli {
    /// Configuration file (default: $KEEPFS_CONFIG, then /etc/keepfs/keepfs.toml, else the
    /// embedded default repository under $KEEPFS_HOME, /var/lib/keepfs as root, or ~/.local/share/keepfs)
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// After the command, push the repository's metrics to this Prometheus Pushgateway
    /// (http://HOST:9091; group job=keepfs unless the URL names one)
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) pushgateway: Option<String>,
    /// After the command, write the repository's metrics to this file, atomically (for
    /// node-exporter's textfile collector: a NAME.prom in its directory)
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) metrics_file: Option<PathBuf>,
    /// Machine-readable tables (backy2's -m): cells separated by '|', sizes in bytes
    #[arg(short = 'm', long)]
    pub(crate) machine_output: bool,
    /// Tables without their header line (backy2's -s)
    #[arg(short = 's', long)]
    pub(crate) skip_header: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum MetadataAction {
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
pub(crate) enum StorageAction {
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
pub(crate) enum KeyAction {
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
pub(crate) enum ConfigAction {
    /// Validate the configuration (--config, $KEEPFS_CONFIG, /etc/keepfs/keepfs.toml, or the
    /// embedded default) and print what it resolved: paths, storages, key sources. Never
    /// prints a secret; touches no repository.
    #[command(after_help = "Examples:\n  keepfs config check\n  keepfs --config /etc/keepfs/keepfs.toml config check")]
    Check,
}

#[derive(Subcommand)]
pub(crate) enum DatabaseAction {
    /// Recreate a lost database from the version and block objects in the storages
    Rebuild {
        /// If the database file is damaged ("database disk image is malformed"), move it
        /// aside (kept as <name>.damaged-<time>) and rebuild a new one
        #[arg(long)]
        replace_damaged: bool,
        /// Make this catalog the storages' owner even where another catalog owns them (a
        /// catalog lost for good, rebuilt elsewhere); that catalog is refused from then on
        #[arg(long)]
        take_over: bool,
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

/// An octal file mode for `mount --mode` (read and write bits only).
pub(crate) fn parse_mode(s: &str) -> std::result::Result<u16, String> {
    let m = u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{s}' is not an octal mode (e.g. 0640)"))?;
    if m & !0o666 != 0 {
        return Err(format!(
            "'{s}': give read and write bits only (e.g. 0640); directories get search bits by themselves"
        ));
    }
    Ok(m)
}

/// The command line's definition, with each command's examples (see `help`).
pub(crate) fn cli_command() -> clap::Command {
    help::with_examples(<Cli as clap::CommandFactory>::command())
}
