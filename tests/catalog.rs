//! The PostgreSQL catalog, as a user meets it: a repository whose `database` is a
//! postgresql:// URL on a real PostgreSQL server (started by the test), moving a
//! repository's catalog from SQLite to PostgreSQL and back (`database migrate`),
//! rebuilding into PostgreSQL, and the ways it is misconfigured or fails: a wrong
//! password, an unreachable server, a database of another repository, a catalog newer
//! than the binary, a server restarted under a repository in use.

mod common;
use common::pg::PgServer;
use common::*;

const BS: usize = 64 * 1024;

/// A repository in a temporary directory whose catalog is `database` (a URL or a path),
/// through a configuration file, as a user sets it up.
fn config_repo(database: &str) -> Repo {
    Repo::with_database(database, "", "")
}

/// Restores version `uid` of `repo` (through its configuration file) and checks it
/// against the image `img` (a file in the repository's directory), by sha256.
fn assert_restores(repo: &Repo, uid: &str, img: &str) {
    let restored = repo.path(&format!("restored-{uid}"));
    repo.ok_cfg(&["restore", uid, &format!("file://{}", restored.display())]);
    assert_eq!(sha256_file(&restored), sha256_file(&repo.path(img)), "{uid} restores as {img}");
    std::fs::remove_file(&restored).unwrap();
}

/// Waits until the catalog at `url` holds object rows (a backup is under way; until its
/// tables exist the query fails, which counts as none); returns the watching connection.
fn wait_for_recorded_objects(url: &str) -> postgres::Client {
    let mut watch = postgres::Client::connect(url, postgres::NoTls).unwrap();
    common::mount::wait_until("the backup to record objects", std::time::Duration::from_secs(120), || {
        watch.query_one("SELECT count(*) FROM objects", &[]).map(|r| r.get::<_, i64>(0)).unwrap_or(0) > 0
    });
    watch
}

/// Every version's stored index, read straight from each catalog.
fn sqlite_indexes(path: &std::path::Path) -> Vec<(i64, Vec<u8>)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut st = conn.prepare("SELECT uid, data FROM version_index ORDER BY uid").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
}

fn pg_indexes(url: &str) -> Vec<(i64, Vec<u8>)> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query("SELECT uid, data FROM version_index ORDER BY uid", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn ls_json(repo: &Repo, env: &[(&str, &str)]) -> serde_json::Value {
    let r = repo.run_env(&["ls", "--format", "json"], env);
    assert_eq!(r.code, 0, "ls: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// A user's session on a PostgreSQL catalog: backups (the second deduplicated against
/// the first), labels, restore byte-identical, rm + cleanup freeing the blocks only the
/// removed version had, all through the server.
#[test]
fn a_repository_on_postgresql_backs_up_restores_and_cleans_up() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("session"));
    let repo = Repo::with_database(&url, "host = \"hv-a\"\n", "");
    // Distinct random blocks: the first one is only in the first version.
    let img = random_bytes(1, 12 * BS + 100);
    std::fs::write(repo.path("img"), &img).unwrap();
    let src = repo.url("img");
    let v1 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k", "-l", "tier=gold"]).trim().to_string();
    let mut img2 = img.clone();
    img2[..BS].copy_from_slice(&random_bytes(77, BS));
    std::fs::write(repo.path("img"), &img2).unwrap();
    let v2 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k"]).trim().to_string();
    let stored_before = repo.block_objects();

    let out = repo.path("out").display().to_string();
    repo.ok_cfg(&["restore", &v1, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file_bytes(&img));
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    let versions = ls.as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["labels"]["tier"], "gold");
    assert_eq!(
        versions[1]["stats"]["bytes_written"].as_u64(),
        Some(BS as u64),
        "the second backup wrote one new block"
    );

    // Another host (KEEPFS_HOST over the configuration's `host`) backs up the same
    // image: every block is referenced, none uploaded again.
    let cfg = repo.config_file();
    let r = repo.run_env(&["--config", &cfg, "backup", &src, "vm-b", "-b", "64k"], &[("KEEPFS_HOST", "hv-b")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let vb = r.stdout.trim().to_string();
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    let of = |uid: &str| ls.as_array().unwrap().iter().find(|v| v["uid"] == uid).cloned().unwrap();
    assert_eq!(of(&v1)["host"], "hv-a", "the configuration's host");
    assert_eq!(of(&vb)["host"], "hv-b");
    assert_eq!(of(&vb)["stats"]["bytes_written"].as_u64(), Some(0), "deduplicated across hosts: {}", of(&vb));
    assert_eq!(repo.block_objects(), stored_before);
    repo.ok_cfg(&["rm", "--force", &vb]);

    repo.ok_cfg(&["rm", "--force", &v1]);
    let done = repo.ok_cfg(&["cleanup"]);
    assert!(done.contains("deleted 1 object(s)"), "{done}");
    assert_eq!(repo.block_objects(), stored_before - 1, "only the block no other version has is gone");
    std::fs::remove_file(repo.path("out")).unwrap();
    repo.ok_cfg(&["restore", &v2, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file_bytes(&img2));
    assert_eq!(pg.psql_in("session", "SELECT COUNT(*) FROM versions"), "1");
}

fn sha256_file_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn a_wrong_password_is_a_one_line_error_with_exit_code_2() {
    let pg = PgServer::start();
    let url = pg.url_with(&pg.create_db("pw"), "not-the-password");
    let repo = config_repo(&url);
    let r = repo.run_cfg(&["ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let line = r.error_line();
    assert!(line.contains("password authentication failed") && line.contains("check the password"), "{line}");
    assert!(line.contains("(it came from the URL)"), "says where the password came from: {line}");
    assert!(!line.contains("not-the-password"), "the password is never printed: {line}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
}

/// A database URL that does not parse (a typo in the port, a password with characters a
/// URL reads otherwise) is one line with exit code 2 that says how to write it, and never
/// shows the password: not in the error, not in `config check`, not from `migrate --to`.
#[test]
fn a_database_url_that_does_not_parse_never_shows_its_password() {
    let repo = config_repo("postgresql://keepfs:s3cret-pw@127.0.0.1:5549x/keepfs");
    let r = repo.run_cfg(&["ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(
        r.error_line().contains("not a PostgreSQL URL") && r.error_line().contains("postgresql://USER"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("s3cret"), "{}", r.stderr);
    let check = repo.run_cfg(&["config", "check"]);
    assert!(!check.stdout.contains("s3cret") && check.stdout.contains("keepfs:***@"), "{}", check.stdout);
    // An unencoded '/', '#' or '@' in the password would make a URL of another host.
    let repo = config_repo("postgresql://k2:p@ss/w#rd@127.0.0.1:1/keepfs");
    let r = repo.run_cfg(&["ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.error_line().contains("percent-encode") && r.error_line().contains("database_password_file"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("p@ss") && !r.stderr.contains("w#rd"), "{}", r.stderr);
    let r = Repo::new().run(&["database", "migrate", "--to", "pg://keepfs:s3cret-pw@db/keepfs"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!r.stderr.contains("s3cret"), "{}", r.stderr);
    // One slash short: not an SQLite file named after the URL, password and all.
    let lite = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
    let mut c = lite.command(&["ls"]);
    c.current_dir(lite.path("")).env("KEEPFS_DATABASE", "postgresql:/keepfs:s3cret-pw@127.0.0.1:1/db");
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("looks like a PostgreSQL URL but is not one") && !stderr.contains("s3cret"), "{stderr}");
    assert!(!lite.path("postgresql:").exists(), "no file was made");
    // The scheme in capitals is still PostgreSQL (nobody listens on port 1).
    let r = config_repo("PostgreSQL://keepfs:s3cret-pw@127.0.0.1:1/keepfs").run_cfg(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("cannot connect to postgresql://keepfs:***@127.0.0.1:1"), "{}", r.stderr);
}

/// The password from a `database_password_file`, then from PGPASSFILE.
#[test]
fn the_password_comes_from_a_file_or_pgpass() {
    let pg = PgServer::start();
    let db = pg.create_db("pwfile");
    let bare = format!("postgresql://{}@127.0.0.1:{}/{db}", common::pg::USER, pg.port);
    let repo = config_repo(&bare);
    std::fs::write(repo.path("pw"), format!("{}\n", common::pg::PASSWORD)).unwrap();
    // Keys come before the first table of the file: the new key goes on top.
    let text = std::fs::read_to_string(repo.path("keepfs.toml")).unwrap();
    let key = format!("database_password_file = \"{}\"\n", repo.path("pw").display());
    std::fs::write(repo.path("keepfs.toml"), key + &text).unwrap();
    assert_eq!(repo.run_cfg(&["ls"]).code, 0);

    let other = config_repo(&bare);
    let no_pw = other
        .run_env(&["--config", other.path("keepfs.toml").to_str().unwrap(), "ls"], &[("PGPASSFILE", "/nonexistent")]);
    assert_eq!(no_pw.code, 2, "{}", no_pw.stderr);
    assert!(no_pw.error_line().contains("none is configured"), "{}", no_pw.stderr);
    // A pgpass file without a line for this connection (libpq matches the host as
    // written: localhost is not 127.0.0.1) is named, with what it lacks.
    let near_miss = other.path("pgpass-localhost");
    std::fs::write(&near_miss, format!("localhost:{}:{db}:{}:{}\n", pg.port, common::pg::USER, common::pg::PASSWORD))
        .unwrap();
    std::fs::set_permissions(&near_miss, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = other.run_env(
        &["--config", other.path("keepfs.toml").to_str().unwrap(), "ls"],
        &[("PGPASSFILE", near_miss.to_str().unwrap())],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.error_line().contains(&format!("has no line for 127.0.0.1:{}:{db}:{}", pg.port, common::pg::USER)),
        "{}",
        r.stderr
    );
    std::fs::write(
        other.path("pgpass"),
        format!("127.0.0.1:{}:{db}:{}:{}\n", pg.port, common::pg::USER, common::pg::PASSWORD),
    )
    .unwrap();
    let pgpass = other.path("pgpass");
    // Readable by others: used, with a warning (libpq would ignore it).
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let r = other.run_env(
        &["--config", other.path("keepfs.toml").to_str().unwrap(), "ls"],
        &[("PGPASSFILE", pgpass.to_str().unwrap())],
    );
    // The same database, another repository's storage: refused, so the password worked.
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("is readable by others (libpq ignores such a file); chmod 0600 it"), "{}", r.stderr);

    // `database migrate --to URL` takes the configuration's password file too (set for
    // the new catalog before `database` names it); it asked for PGPASSFILE instead.
    let target = pg.create_db("pwmigrate");
    let lite = config_repo("placeholder");
    let sqlite = lite.path("keepfs.sqlite");
    let pw_key = format!("database_password_file = \"{}\"\n", lite.path("pw").display());
    lite.set_database(sqlite.to_str().unwrap(), &pw_key, "");
    std::fs::write(lite.path("pw"), format!("{}\n", common::pg::PASSWORD)).unwrap();
    std::fs::write(lite.path("img"), random_bytes(9, 4 * BS)).unwrap();
    lite.ok_cfg(&["backup", &lite.url("img"), "vm", "-b", "64k"]);
    let to = format!("postgresql://{}@127.0.0.1:{}/{target}", common::pg::USER, pg.port);
    let r = lite.run_env(
        &["--config", &lite.config_file(), "database", "migrate", "--to", &to],
        &[("PGPASSFILE", "/nonexistent")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A server that accepts connections but never answers: the command gives up after the
/// connect timeout with one line (exit 1) instead of hanging.
#[test]
fn an_unreachable_database_times_out_instead_of_hanging() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let repo = config_repo(&format!("postgresql://keepfs:x@127.0.0.1:{port}/keepfs?connect_timeout=2"));
    let r = repo.run_cfg(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("no answer within"), "{}", r.stderr);
    drop(silent);
    // Nobody listening at all: refused at once, one line, exit 1.
    let r = repo.run_cfg(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("cannot connect to postgresql://keepfs:***@127.0.0.1"), "{}", r.stderr);
    assert!(r.error_line().contains("is the server running, and listening on that host and port?"), "{}", r.stderr);
    // A connect_timeout that is not a number is named (the client said "invalid
    // connection string").
    let bad = config_repo("postgresql://keepfs:x@127.0.0.1:1/keepfs?connect_timeout=abc");
    let r = bad.run_cfg(&["ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("connect_timeout=abc is not a whole number of seconds"), "{}", r.stderr);
    // Something else at that port (a web server): it answers in its own tongue and
    // hangs up; the line asks whether that is PostgreSQL.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = web.accept().unwrap();
        let _ = c.read(&mut [0u8; 512]);
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let repo = config_repo(&format!("postgresql://keepfs:x@127.0.0.1:{port}/keepfs?sslmode=disable"));
    let r = repo.run_cfg(&["ls"]);
    server.join().unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(r.error_line().contains("is a PostgreSQL server listening at that host and port?"), "{}", r.stderr);
}

/// Hosts started together on a new, empty database (a cluster's first backup run): each
/// process creates the schema or finds it made, under the catalog's lock; none fails,
/// and the schema is made once.
#[test]
fn processes_opening_a_new_postgresql_catalog_together_all_succeed() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("together"));
    let repo = config_repo(&url);
    std::fs::write(repo.path("img"), random_bytes(13, 2 * BS)).unwrap();
    let cfg = repo.config_file();
    let src = repo.url("img");
    let children: Vec<_> = (0..6)
        .map(|i| {
            let host = format!("hv-{i}");
            let args: Vec<&str> = if i % 2 == 0 {
                vec!["--config", &cfg, "ls", "--format", "json"]
            } else {
                vec!["--config", &cfg, "backup", &src, "vm", "-b", "64k"]
            };
            repo.command(&args)
                .env("KEEPFS_HOST", &host)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = wait_output_within(c, COMMAND_LIMIT, "a keepfs opening the new catalog");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(pg.psql_in("together", "SELECT count(*) FROM keepfs_schema"), "1");
    assert_eq!(
        pg.psql_in("together", "SELECT version FROM keepfs_schema"),
        keepfs::catalog::SCHEMA_VERSION.to_string()
    );
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 3, "{ls}");
    let v = ls[0]["uid"].as_str().unwrap().to_string();
    assert_restores(&repo, &v, "img");
}

#[test]
fn a_database_of_another_repository_is_refused_and_a_newer_catalog_too() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("shared"));
    let first = config_repo(&url);
    std::fs::write(first.path("img"), mixed_image(2, 4, BS, 0)).unwrap();
    first.ok_cfg(&["backup", &first.url("img"), "vm", "-b", "64k"]);
    let second = config_repo(&url);
    let r = second.run_cfg(&["ls"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("belongs to another repository"), "{}", r.stderr);

    pg.psql_in("shared", "UPDATE keepfs_schema SET version = 99");
    let r = first.run_cfg(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.error_line().contains("newer than this keepfs knows") && r.error_line().contains("upgrade keepfs"),
        "{}",
        r.stderr
    );

    // The same of an SQLite catalog, and nothing is written to it.
    let lite = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
    lite.ok(&["init"]);
    rusqlite::Connection::open(lite.db_file()).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let before = std::fs::read(lite.db_file()).unwrap();
    let r = lite.run(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("schema version 99, newer than this keepfs knows"), "{}", r.stderr);
    assert_eq!(std::fs::read(lite.db_file()).unwrap(), before, "the newer catalog was left as it was");
}

/// SQLite → PostgreSQL → a new SQLite file: `ls --format json` and every version's
/// index are the same in all three, and the repository works on the new catalog (a
/// backup deduplicates against blocks recorded before the move, restores match).
#[test]
fn database_migrate_copies_the_catalog_to_postgresql_and_back() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("moved"));
    let repo = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
    let img = mixed_image(3, 10, BS, 0);
    std::fs::write(repo.path("img"), &img).unwrap();
    let v1 = repo.backup("img", "vm", &["-b", "64k", "-l", "app=db"]);
    let v2 = repo.backup("img", "other", &["-b", "64k"]);
    repo.ok(&["protect", &v2]);
    let sqlite = repo.db_file();
    let before = ls_json(&repo, &[]);

    let r = repo.run(&["database", "migrate", "--to", &url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("2 version(s)") && r.stderr.contains("checked"), "{}", r.stderr);
    assert!(!r.stderr.contains(common::pg::PASSWORD), "no password in messages: {}", r.stderr);
    let on_pg = ls_json(&repo, &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(on_pg, before);
    assert_eq!(pg_indexes(&url), sqlite_indexes(&sqlite));

    // The old catalog is left behind, marked: every command on it (a cron job that
    // still uses the embedded default) is refused with one line naming the new one.
    for args in [vec!["ls"], vec!["backup", &repo.url("img"), "stale", "-b", "64k"], vec!["cleanup"]] {
        let stale = repo.run(&args);
        assert_eq!(stale.code, 4, "{args:?}: {}", stale.stderr);
        assert_eq!(stale.stderr.trim().lines().count(), 1, "{}", stale.stderr);
        let line = stale.error_line();
        assert!(line.contains("was migrated to postgresql://") && line.contains("set `database`"), "{line}");
        assert!(!line.contains(common::pg::PASSWORD), "{line}");
    }
    assert_eq!(ls_json(&repo, &[("KEEPFS_DATABASE", &url)]), before, "nothing was written meanwhile");
    // Into a catalog that holds something: refused.
    let other = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
    other.ok(&["init"]);
    let again = other.run(&["database", "migrate", "--to", &url]);
    assert_eq!(again.code, 4, "{}", again.stderr);
    assert!(again.error_line().contains("not empty"), "{}", again.stderr);

    // The repository goes on on PostgreSQL: a backup of the same image stores nothing new.
    let blocks = repo.block_objects();
    let v3 = repo
        .run_env(&["backup", &repo.url("img"), "vm", "-b", "64k"], &[("KEEPFS_DATABASE", &url)])
        .stdout
        .trim()
        .to_string();
    assert!(v3.starts_with('V'), "backup on PostgreSQL: {v3}");
    assert_eq!(repo.block_objects(), blocks, "deduplicated against objects recorded before the move");
    let out = repo.path("out");
    let r = repo.run_env(&["restore", &v1, &format!("file://{}", out.display())], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&repo.path("img")));

    // And back into a new SQLite file (given relative: it is printed absolute, ready
    // for `database`); then PostgreSQL is the catalog left behind.
    let on_pg = ls_json(&repo, &[("KEEPFS_DATABASE", &url)]);
    let back = repo.path("back.sqlite");
    let mut c = repo.command(&["database", "migrate", "--to", "back.sqlite"]);
    c.current_dir(repo.path("")).env("KEEPFS_DATABASE", &url);
    let r = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("copied the catalog into {}", back.display())), "{stderr}");
    assert_eq!(ls_json(&repo, &[("KEEPFS_DATABASE", back.to_str().unwrap())]), on_pg);
    assert_eq!(sqlite_indexes(&back), pg_indexes(&url));
    assert_eq!(on_pg.as_array().unwrap().len(), 3);
    let stale = repo.run_env(&["ls"], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(stale.code, 4, "PostgreSQL is the old catalog now: {}", stale.stderr);
    assert!(stale.error_line().contains("copies this one again"), "{}", stale.stderr);
    // The new one lost: the old catalog can be copied again (and only that).
    let again = repo.path("again.sqlite");
    let r = repo.run_env(&["database", "migrate", "--to", again.to_str().unwrap()], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(ls_json(&repo, &[("KEEPFS_DATABASE", again.to_str().unwrap())]), on_pg);
}

/// `database rebuild` into an empty PostgreSQL database recreates what the SQLite
/// catalog held, from the storage alone. The storage belongs to the SQLite catalog,
/// which may still be in use: the rebuilt catalog restores but does not write until
/// `--take-over` says the old one is gone.
#[test]
fn database_rebuild_works_into_postgresql() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("rebuilt"));
    let repo = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
    std::fs::write(repo.path("img"), mixed_image(4, 8, BS, 10)).unwrap();
    let v1 = repo.backup("img", "vm", &["-b", "64k", "-l", "k=v"]);
    repo.backup("img", "vm", &["-b", "64k"]);
    let before = ls_json(&repo, &[]);
    let r = repo.run_env(&["database", "rebuild"], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("this one can restore from it, not write to it"), "{}", r.stderr);
    let img = repo.url("img");
    let r = repo.run_env(&["backup", &img, "vm"], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.error_line().contains("belongs to another catalog") && r.error_line().contains("--take-over"),
        "{}",
        r.stderr
    );
    let r = repo.run_env(&["database", "rebuild", "--take-over"], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(ls_json(&repo, &[("KEEPFS_DATABASE", &url)]), before);
    let out = repo.path("out");
    let r = repo.run_env(&["restore", &v1, &format!("file://{}", out.display())], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&repo.path("img")));
    let scrub = repo.run_env(&["deep-scrub", &v1], &[("KEEPFS_DATABASE", &url)]);
    assert_eq!(scrub.code, 0, "{}", scrub.stderr);
}

/// The server restarts between commands of a repository in use: the next command
/// connects again and finds everything as it was.
#[test]
fn a_restarted_server_is_met_with_a_new_connection() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("restart"));
    let repo = config_repo(&url);
    std::fs::write(repo.path("img"), mixed_image(5, 6, BS, 0)).unwrap();
    let v1 = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    // A long-running process (a mount, an NBD server) holds its connection across the
    // restart: its next request, the first after the pause, is served, not failed with
    // "connection closed" (the drill saw a read through the mount fail once, then work).
    let cfg = repo.config_file();
    let engine = keepfs::Repository::open(keepfs::config::Config::discover(Some(cfg.as_ref())).unwrap()).unwrap();
    assert_eq!(engine.list(None).unwrap().len(), 1);
    let used = std::time::Instant::now();
    pg.restart();
    // (A connection is checked once it has been idle a second; a restart is slower than
    // that, but the test makes sure.)
    if let Some(left) = std::time::Duration::from_millis(1100).checked_sub(used.elapsed()) {
        std::thread::sleep(left);
    }
    let listed = engine.list(None).unwrap();
    assert_eq!(listed[0].uid.to_string(), v1);
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(ls[0]["uid"], v1.as_str());
    assert_eq!(ls[0]["status"], "valid");
}

/// PostgreSQL restarts while a backup runs (the server ends every session): the backup
/// fails with one line and leaves an incomplete version, nothing half-committed, and
/// `backup --continue` finishes it into a version that restores byte-identical. (A
/// backup that finishes before the restart has nothing to continue.)
#[test]
fn a_backup_in_flight_when_the_server_restarts_is_finished_by_continue() {
    let pg = PgServer::start();
    let db = pg.create_db("inflight");
    let repo = config_repo(&pg.url(&db));
    std::fs::write(repo.path("img"), random_bytes(61, 24 << 20)).unwrap();
    let url = repo.url("img");
    let cfg = repo.config_file();
    let child = repo
        .command(&["--config", &cfg, "backup", &url, "vm", "-b", "4k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a state: the version exists and objects are being recorded.
    drop(wait_for_recorded_objects(&pg.url(&db)));
    pg.restart();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let uid = match out.status.code() {
        Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Some(1) => {
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("keepfs: error:")).collect();
            assert_eq!(errors.len(), 1, "{stderr}");
            let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
            assert_eq!(ls[0]["status"], "incomplete", "nothing half-committed: {ls}");
            let uid = ls[0]["uid"].as_str().unwrap().to_string();
            let done = repo.ok_cfg(&["backup", "--continue", &uid, &url, "vm"]);
            assert_eq!(done.trim(), uid);
            uid
        }
        other => panic!("backup ended with {other:?}: {stderr}"),
    };
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["status"], "valid");
    assert_restores(&repo, &uid, "img");
}

/// Two hosts share a catalog, and one host's clock is two days behind (a real clock,
/// shifted by libfaketime). Its backup runs while the other host cleans up: the cleanup
/// must judge the backup by the catalog's clock, see it running and spare everything it
/// wrote, so the version it commits restores byte-identical. (Judged by the hosts'
/// clocks, its session looked two days dead and its objects two days old: the cleanup
/// deleted them under it.)
#[test]
fn a_host_with_a_wrong_clock_keeps_its_running_backup_safe_from_another_hosts_cleanup() {
    assert!(
        std::process::Command::new("faketime").arg("--version").output().is_ok(),
        "faketime is not installed (apt-get install faketime; .ci/run installs it)"
    );
    let pg = PgServer::start();
    let db = pg.create_db("clocks");
    let repo = Repo::with_database(&pg.url(&db), "", "write_bandwidth = \"256k\"\n");
    let cfg = repo.config_file();
    std::fs::write(repo.path("img"), random_bytes(71, 2 << 20)).unwrap();
    let url = repo.url("img");

    let behind = std::process::Command::new("faketime")
        .args(["-f", "-2d", KEEPFS, "--config", &cfg, "backup", &url, "vm", "-b", "64k"])
        .env("KEEPFS_HOST", "behind")
        // A wrong wall clock, as a misconfigured host has; its monotonic clock stays
        // true. (libfaketime would shift that too, and the kernel then waits out a timed
        // wait's absolute deadline decades away: a hang no real host shows.)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("KEEPFS_DATABASE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a state: the backup has recorded objects.
    let mut watch = wait_for_recorded_objects(&pg.url(&db));
    // The backup's session and version carry the catalog's time, not its host's.
    let skew: i64 = watch
        .query_one(
            "SELECT max(abs((extract(epoch from clock_timestamp()) * 1000)::bigint - started_ms)) FROM sessions WHERE host = 'behind'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(skew < 3_600_000, "the session's start is the catalog's time, not the host's (off by {skew} ms)");

    let cleanup = repo
        .command(&["--config", &cfg, "cleanup"])
        .env("KEEPFS_HOST", "ahead")
        .env_remove("KEEPFS_DATABASE")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&cleanup.stdout).to_string() + &String::from_utf8_lossy(&cleanup.stderr);
    assert!(cleanup.status.success(), "{said}");
    assert!(said.contains("its backup is running"), "the other host's backup is seen running: {said}");
    assert!(
        said.contains(" on behind, last heartbeat ")
            && said.contains(
                "(of another host, container or boot) counts as running until 10 min after its last heartbeat"
            ),
        "names the other host's process and how long it counts as running: {said}"
    );
    assert!(said.contains("deleted 0 object(s)"), "{said}");

    let out = behind.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    let date = ls[0]["date"].as_str().unwrap_or_default().to_string();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(date.starts_with(&today), "the version is dated by the catalog's clock: {date}");
    assert_eq!(ls[0]["host"], "behind", "the version records the host it was made on");
    // So does its version object: a catalog rebuilt from the storage knows the host too.
    let obj = std::fs::read(repo.home().join("storage/versions").join(&uid)).unwrap();
    let (v, _) = keepfs::repo::decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
    assert_eq!(v.host.as_deref(), Some("behind"));
    let deep = repo.run_cfg(&["deep-scrub", &uid]);
    assert_eq!(deep.code, 0, "{}", deep.stderr);
    assert_restores(&repo, &uid, "img");
}

/// Two copies of one catalog on two hosts (a copy of the SQLite file taken before the
/// first backup, used on another host), backing up into one storage: the storage's
/// owner lets both in, since they are the same catalog (two different catalogs are
/// refused at once: `concurrency::a_second_catalog_on_one_storage_is_refused_…`). The
/// second host's first backup is refused (its uid is taken), naming the fixes; a copy
/// that knows only some of the storage's versions warns at each backup, and its cleanup
/// refuses (it would delete the other versions' blocks), saying what to do; once it
/// knows them all, cleanup keeps every version whole, and does not delete the blocks
/// of the other's running backup.
#[test]
fn copies_of_one_catalog_on_one_storage_are_warned_about_and_cleanup_refuses() {
    let shared = tempfile::tempdir().unwrap();
    let host = |seed: u64| {
        let repo = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
        let config = format!(
            "home = \"{home}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{storage}\"\n",
            home = repo.home().display(),
            storage = shared.path().display()
        );
        std::fs::write(repo.path("keepfs.toml"), config).unwrap();
        std::fs::write(repo.path("img"), random_bytes(seed, 8 * BS)).unwrap();
        repo
    };
    let (a, b) = (host(7), host(14));
    // A's catalog, made and claiming the storage, copied to B before A's first backup.
    a.ok_cfg(&["init"]);
    std::fs::create_dir_all(b.home()).unwrap();
    std::fs::copy(a.home().join("keepfs.sqlite"), b.home().join("keepfs.sqlite")).unwrap();
    let v1 = a.ok_cfg(&["backup", &a.url("img"), "vm-a", "-b", "64k"]).trim().to_string();
    let v2 = a.ok_cfg(&["backup", &a.url("img"), "vm-a", "-b", "64k"]).trim().to_string();

    let r = b.run_cfg(&["backup", &b.url("img"), "vm-b", "-b", "64k"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("already holds version {v1}")), "{}", r.stderr);
    assert!(r.error_line().contains("one shared catalog"), "{}", r.stderr);

    // A catalog that knows the newer version only (an older copy, say).
    b.ok_cfg(&["metadata", "restore", &v2]);
    let r = b.run_cfg(&["backup", &b.url("img"), "vm-b", "-b", "64k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v3 = r.stdout.trim().to_string();
    let warning = r.stderr.lines().find(|l| l.starts_with("keepfs: warning:")).unwrap_or_default();
    assert!(warning.contains(&format!("1 version(s) this catalog does not know ({v1})")), "{}", r.stderr);
    assert!(warning.contains("postgresql://"), "{warning}");

    let c = b.run_cfg(&["cleanup"]);
    assert_eq!(c.code, 4, "{}", c.stderr);
    assert!(c.error_line().contains(&format!("keepfs metadata restore {v1}")), "{}", c.stderr);
    assert!(c.error_line().contains("one shared catalog"), "{}", c.stderr);

    b.ok_cfg(&["metadata", "restore", &v1]);
    b.ok_cfg(&["cleanup"]);
    for (repo, uid) in [(&b, &v1), (&b, &v2), (&b, &v3)] {
        let out = repo.path("out");
        repo.ok_cfg(&["restore", "--force", uid, &format!("file://{}", out.display())]);
        let want = if uid == &v3 { b.path("img") } else { a.path("img") };
        assert_eq!(sha256_file(&out), sha256_file(&want), "{uid}");
    }

    // Now that each knows all the versions, A backs up a new image, slowly (256 kB/s: a 64 KiB block
    // every quarter second), and B cleans up while it runs. A's blocks are files no row
    // of B's names, and its version does not exist yet: B keeps them (younger than
    // incomplete_grace) instead of deleting them from under the running backup.
    a.ok_cfg(&["metadata", "restore", &v3]);
    let blocks = || common::files_under(&shared.path().join("blocks")).len();
    std::fs::write(a.path("new"), random_bytes(21, 32 * BS)).unwrap();
    let slow = a.path("slow.toml");
    let text = std::fs::read_to_string(a.path("keepfs.toml")).unwrap();
    std::fs::write(&slow, format!("{text}write_bandwidth = \"256k\"\n")).unwrap();
    let before = blocks();
    let backup = a
        .command(&["--config", slow.to_str().unwrap(), "backup", &a.url("new"), "vm-a2", "-b", "64k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::mount::wait_until("A's backup to store 12 blocks", std::time::Duration::from_secs(60), || {
        blocks() >= before + 12
    });
    let c = b.run_cfg(&["cleanup"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let said = format!("{}{}", c.stdout, c.stderr);
    assert!(said.contains("that no version or backup of this catalog names"), "{said}");
    let out = backup.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v4 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    a.ok_cfg(&["deep-scrub", &v4]);
    assert_restores(&a, &v4, "new");
}

/// A host that goes silent for longer than other hosts wait for (a paused VM, a stopped
/// process) is taken for dead: another host's cleanup removes its session and, with no
/// grace for incomplete versions, deletes the objects its backup had stored and those it
/// was storing. When the silent host wakes up, its backup must neither record objects
/// whose rows the cleanup removed (rows saying "present" for files that are gone, which
/// later backups would deduplicate against) nor commit a version that names deleted
/// objects: it fails with one line saying what happened, the version stays incomplete,
/// and `backup --continue` stores what is missing; the result restores byte-identical.
/// Ten minutes of silence are simulated by ageing the session's heartbeat in the
/// catalog (time passing is the one fault this test cannot wait for).
#[test]
fn a_host_taken_for_dead_cannot_commit_what_a_cleanup_took_from_under_it() {
    let pg = PgServer::start();
    let db = pg.create_db("silent");
    let url = pg.url(&db);
    let repo = Repo::with_database(&url, "incomplete_grace = \"0\"\n", "write_bandwidth = \"1m\"\n");
    let cfg = repo.config_file();
    // 1,024 blocks of 4 KiB: recorded in batches of 128, so some are recorded and some
    // stored but not yet recorded when the host goes silent.
    std::fs::write(repo.path("img"), random_bytes(81, 4 << 20)).unwrap();
    let img = repo.url("img");

    let silent = repo
        .command(&["--config", &cfg, "backup", &img, "vm", "-b", "4k"])
        .env("KEEPFS_HOST", "silent")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let frozen = repo.freeze_backup_pg(&url, &silent, "the backup to record objects", |s| {
        s.status.as_deref() == Some("incomplete") && s.recorded > 0 && s.stored as u64 > s.recorded
    });
    let mut catalog = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let aged = catalog
        .execute("UPDATE sessions SET heartbeat_ms = heartbeat_ms - 11 * 60 * 1000 WHERE host = 'silent'", &[])
        .unwrap();
    assert!(aged >= 1, "the silent host's session");

    let cleanup = repo.command(&["--config", &cfg, "cleanup"]).env("KEEPFS_HOST", "cleaner").output().unwrap();
    let said = String::from_utf8_lossy(&cleanup.stdout).to_string() + &String::from_utf8_lossy(&cleanup.stderr);
    assert!(cleanup.status.success(), "{said}");
    assert!(!said.contains("deleted 0 object(s)"), "the silent host's objects were taken: {said}");

    frozen.resume();
    let out = silent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the silent host's backup must fail: {stderr}");
    assert!(stderr.contains("for dead"), "{stderr}");
    // Every object the catalog calls present is in the storage (files it stored after
    // waking and could not record are orphans, swept by a later cleanup).
    for row in catalog.query("SELECT id FROM objects WHERE state = 0", &[]).unwrap() {
        let id = keepfs::block::BlockId::from_slice(row.get::<_, &[u8]>(0)).unwrap();
        let file = repo.home().join("storage").join(id.storage_key());
        assert!(file.exists(), "the catalog says {id} is present, its file is gone");
    }
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(ls[0]["status"], "incomplete", "nothing committed: {ls}");
    let uid = ls[0]["uid"].as_str().unwrap().to_string();

    let done = repo
        .command(&["--config", &cfg, "backup", "--continue", &uid, &img, "vm"])
        .env("KEEPFS_HOST", "silent")
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let deep = repo.run_cfg(&["deep-scrub", &uid]);
    assert_eq!(deep.code, 0, "{}", deep.stderr);
    assert_restores(&repo, &uid, "img");
}

/// A version's index on its way to the catalog (a `metadata import` over a slow network,
/// here stalled after its first piece: a test build's fault point) holds up no other
/// host: it is sent before the write lock is taken, so a label change of another version
/// commits meanwhile. The import, killed there, leaves nothing behind; run again, it
/// brings the version back whole.
#[test]
fn an_index_on_its_way_to_the_catalog_holds_up_no_other_writer() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("staged"));
    let repo = config_repo(&url);
    std::fs::write(repo.path("img"), mixed_image(6, 8, BS, 10)).unwrap();
    let src = repo.url("img");
    let v1 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k"]).trim().to_string();
    let v2 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k"]).trim().to_string();
    let doc = repo.path("v1.json").display().to_string();
    repo.ok_cfg(&["metadata", "export", &v1, &doc]);
    repo.ok_cfg(&["rm", "--force", &v1]);

    let cfg = repo.config_file();
    let mut import = repo
        .command(&["--config", &cfg, "metadata", "import", &doc])
        .env("KEEPFS_TEST_INDEX_SEND_STALL_MS", "300000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut watch = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    common::mount::wait_until("the import to send its index", std::time::Duration::from_secs(120), || {
        watch
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY pg_temp.staged_index%'", &[])
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            > 0
    });
    // Another writer, while the index is half sent.
    let r = repo.run_cfg(&["label", &v2, "k=v"]);
    assert_eq!(r.code, 0, "a label change waited for an index being sent: {}", r.stderr);
    assert!(import.try_wait().unwrap().is_none(), "the import ended before the label change: nothing was shown");

    import.kill().unwrap();
    import.wait().unwrap();
    let ls = ls_json(&repo, &[("KEEPFS_DATABASE", &url)]);
    let uids: Vec<&str> = ls.as_array().unwrap().iter().map(|v| v["uid"].as_str().unwrap()).collect();
    assert_eq!(uids, vec![v2.as_str()], "a killed import left a version behind");
    assert_eq!(ls[0]["labels"]["k"], "v");
    let v1_num: i64 = v1.trim_start_matches('V').parse().unwrap();
    assert!(pg_indexes(&url).iter().all(|(uid, _)| *uid != v1_num), "a killed import left an index behind");

    let imported = repo.ok_cfg(&["metadata", "import", &doc]);
    assert_eq!(imported.trim(), v1);
    let out = repo.path("out");
    repo.ok_cfg(&["restore", &v1, &format!("file://{}", out.display())]);
    assert_eq!(sha256_file(&out), sha256_file(&repo.path("img")));
}

/// A process that holds the catalog's write lock and hangs (here a transaction of this
/// test holding the advisory lock) makes a writer give up after `lock_timeout` with one
/// line (exit 1), and write nothing, instead of waiting for ever. (60 s by default; the
/// URL's own `options=-c lock_timeout=…` is kept, here 2 s.)
#[test]
fn a_writer_behind_a_hung_lock_holder_gives_up_with_one_line() {
    let pg = PgServer::start();
    let db = pg.create_db("hung");
    let url = pg.url(&db);
    let repo = config_repo(&format!("{url}?options=-c%20lock_timeout%3D2000"));
    std::fs::write(repo.path("img"), mixed_image(8, 4, BS, 0)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let held = common::pg::WriteLockHeld::take(&url);
    let r = repo.run_cfg(&["label", &v, "k=v"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(
        r.error_line().contains("lock timeout") && r.error_line().contains("`keepfs database sessions` lists"),
        "{}",
        r.stderr
    );
    held.release();
    let ls = ls_json(&repo, &[]);
    assert!(ls[0]["labels"].get("k").is_none(), "nothing was written: {ls}");
    repo.ok_cfg(&["label", &v, "k=v"]);
}

/// A server whose processes are stopped (a hung host: its kernel still acknowledges
/// every packet, so neither TCP keepalives nor `tcp_user_timeout` notice) is met in the
/// middle of a statement. The statement is given up with one line once a new connection
/// gets no answer either, instead of waiting until the server wakes (the synchronous
/// client waited for ever). Nothing of it is committed, and once the server runs again
/// the next command connects again and works.
#[test]
fn a_statement_a_stopped_server_never_answers_is_given_up() {
    let pg = PgServer::start();
    let db = pg.create_db("stopped");
    let url = pg.url(&db);
    let repo = config_repo(&format!("{url}?connect_timeout=2"));
    std::fs::write(repo.path("img"), mixed_image(8, 4, BS, 0)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    // The label waits for the write lock this test holds; the server stops meanwhile.
    let (held, mut child) = pg.label_behind_the_write_lock(&repo, &url, &v);
    let stopped = pg.stop_processes();
    let ended = common::poll_for(std::time::Duration::from_secs(120), || child.try_wait().unwrap());
    if ended.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    drop(stopped);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended.is_some(), "the label still waited for the stopped server after 120 s: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("keepfs: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(errors[0].contains("stopped answering"), "{stderr}");
    assert!(!errors[0].contains(common::pg::PASSWORD), "{stderr}");
    held.release();
    let ls = ls_json(&repo, &[]);
    assert!(ls[0]["labels"].get("k").is_none(), "nothing was written: {ls}");
    repo.ok_cfg(&["label", &v, "k=v"]);
    assert_restores(&repo, &v, "img");
}

/// A repository on a shared catalog whose storage moved (a new mount point): the catalog
/// recorded the old place and took the configuration for another repository's, with no
/// way out but SQL. The storage's `owner` object names this catalog, so the new place is
/// taken (with a note) and everything restores and backs up there; a storage no catalog
/// owns yet is still another repository.
#[test]
fn a_storage_moved_to_a_new_place_is_still_its_repository() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("moved"));
    let repo = config_repo(&url);
    std::fs::write(repo.path("img"), mixed_image(3, 6, BS, 0)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let old = repo.home().join("storage");
    let new = repo.path("moved-storage");
    std::fs::rename(&old, &new).unwrap();
    let cfg = std::fs::read_to_string(repo.config_file()).unwrap();
    let moved = cfg.replace(&format!("path = \"{}\"", old.display()), &format!("path = \"{}\"", new.display()));
    assert_ne!(moved, cfg);
    std::fs::write(repo.config_file(), moved).unwrap();

    let r = repo.run_cfg(&["ls", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("is owned by this catalog, so that is the repository's place from now on")
            && r.stderr.contains(&new.display().to_string()),
        "{}",
        r.stderr
    );
    let r = repo.run_cfg(&["ls"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "said once");
    assert_restores(&repo, &v, "img");
    std::fs::write(repo.path("img2"), mixed_image(3, 7, BS, 0)).unwrap();
    let w = repo.ok_cfg(&["backup", &repo.url("img2"), "vm", "-b", "64k"]).trim().to_string();
    assert_restores(&repo, &w, "img2");
    assert!(!old.exists(), "nothing made at the old place");

    // A host that reaches the same storage by another path (a share mounted elsewhere,
    // here a symbolic link) is this repository too, and the recorded place stays: hosts
    // do not take turns rewriting it.
    let alias = repo.path("alias");
    std::os::unix::fs::symlink(&new, &alias).unwrap();
    let cfg = std::fs::read_to_string(repo.config_file()).unwrap();
    let other_path = repo.path("other.toml");
    std::fs::write(
        &other_path,
        cfg.replace(&format!("path = \"{}\"", new.display()), &format!("path = \"{}\"", alias.display())),
    )
    .unwrap();
    let r = repo.run(&["--config", other_path.to_str().unwrap(), "ls"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "by another path");
    let r = repo.run_cfg(&["ls"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "the recorded place did not change");

    let other = config_repo(&url);
    let r = other.run_cfg(&["ls"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("belongs to another repository"), "{}", r.stderr);
}

/// A mount whose catalog server stops (SIGSTOP) while requests wait for it: the first
/// request finds the server silent and fails (EIO) with one line; the requests queued
/// behind it fail with the same line at once instead of each waiting for a connection
/// of its own in turn (a drill saw the fifth of five fail after 30 s, and a cleanup
/// after 66 s). Nobody tries to connect while the server is known silent, so the mount's
/// log says "stopped answering", never "cannot connect". Once the server runs again the
/// mount serves the same files, byte-identical.
#[test]
fn requests_behind_a_silent_server_fail_at_once_with_its_line() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("silent"));
    let repo = config_repo(&format!("{url}?connect_timeout=2"));
    let mut uids = Vec::new();
    for seed in 0..4 {
        std::fs::write(repo.path("img"), mixed_image(40 + seed, 4, BS, 0)).unwrap();
        uids.push(repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string());
    }
    let cfg = repo.config_file();
    let dir = repo.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = common::mount::Mount::at_with_env(
        &repo,
        &dir,
        &["--config", &cfg],
        &[("KEEPFS_TEST_CATALOG_PATIENCE_MS", "1000")],
    );
    // A file being written into incoming/ (a draft with a session of its own), to be
    // closed while the server is stopped: its commit fails, and so does its session's end.
    let mut writing = std::fs::File::create(m.p("incoming/frozen")).unwrap();
    std::io::Write::write_all(&mut writing, &mixed_image(50, 4, BS, 0)).unwrap();
    let stopped = pg.stop_processes();
    // Versions the mount has not looked up yet: each stat asks the catalog.
    let (tx, rx) = std::sync::mpsc::channel();
    for uid in &uids[..3] {
        let (tx, path) = (tx.clone(), m.p(&format!("by_version/{uid}/data")));
        std::thread::spawn(move || tx.send(std::fs::metadata(path).map(|_| ())).unwrap());
    }
    let answers: Vec<std::io::Result<()>> =
        (0..3).map(|_| rx.recv_timeout(std::time::Duration::from_secs(120)).expect("a stat hung")).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::IntoRawFd;
        // SAFETY: the descriptor is this File's, closed once here.
        let closed = unsafe { libc::close(writing.into_raw_fd()) };
        tx.send(if closed == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }).unwrap()
    });
    // Whatever close says (the commit may come after it), it must not hang.
    let _ = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the close hung");
    // The commit runs as the file is released (close may have returned before it): the
    // server is resumed once the mount has given the draft up.
    common::mount::wait_until("the draft's commit to fail", std::time::Duration::from_secs(120), || {
        m.log_text().contains("could not be removed")
    });
    assert!(m.log_text().contains("keepfs: error: frozen was not committed as V"), "named: {}", m.log_text());
    drop(stopped);
    for a in &answers {
        assert_eq!(a.as_ref().map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "{}", m.log_text());
    }
    let log = m.log_text();
    assert!(log.contains("stopped answering"), "{log}");
    assert!(!log.contains("cannot connect"), "nobody connects to a server known silent: {log}");
    // The server back: once the silence is over (the connect limit), the mount serves
    // the same versions byte-identical.
    let img = repo.path("img");
    let fourth = m.p(&format!("by_version/{}/data", uids[3]));
    common::mount::wait_until("the mount to serve again", std::time::Duration::from_secs(60), || {
        std::fs::read(&fourth).is_ok()
    });
    assert_eq!(sha256_file(&fourth), sha256_file(&img));
    std::fs::write(&img, mixed_image(40, 4, BS, 0)).unwrap();
    assert_eq!(sha256_file(&m.p(&format!("by_version/{}/data", uids[0]))), sha256_file(&img));
    // The failed draft's session does not stay "running" for the mount's life (cleanup
    // would keep its objects): it is ended once the catalog answers again, at the
    // latest when the mount begins another session.
    std::fs::write(m.p("incoming/after"), mixed_image(51, 4, BS, 0)).unwrap();
    let sessions = repo.ok_cfg(&["database", "sessions", "--format", "json"]);
    let sessions: serde_json::Value = serde_json::from_str(&sessions).unwrap();
    let stale: Vec<&serde_json::Value> = sessions
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["purpose"].as_str().unwrap_or("").contains("frozen"))
        .collect();
    assert!(stale.is_empty(), "the failed draft's session is still there: {sessions}\n{}", m.log_text());
    m.unmount();
}

/// An NBD client that connects while the catalog's server is stopped is told why the
/// export cannot be opened (an error reply to NBD_OPT_GO, which nbdinfo prints), instead
/// of a connection cut off after the server said yes (a drill saw "server disconnected
/// unexpectedly"). Once the catalog is back, the client reads the version byte-identical.
#[test]
fn an_nbd_client_is_told_why_when_the_catalog_does_not_answer() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("nbdsilent"));
    let repo = config_repo(&format!("{url}?connect_timeout=2"));
    std::fs::write(repo.path("img"), mixed_image(60, 4, BS, 0)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let cfg = repo.config_file();
    let srv = common::nbd::Server::start_with_env(
        &repo,
        &["--config", &cfg, "--read-only"],
        &[("KEEPFS_TEST_CATALOG_PATIENCE_MS", "1000")],
    );
    let stopped = pg.stop_processes();
    let mut info = std::process::Command::new("nbdinfo");
    info.arg(srv.url(&v));
    let out = output_within(info, std::time::Duration::from_secs(120), "nbdinfo");
    drop(stopped);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // An error reply (libnbd of Debian 12 shows only that; newer ones show its message
    // too), not a connection cut off.
    assert!(
        (stderr.contains("opt_go") || stderr.contains(&format!("export '{v}' cannot be looked up now")))
            && !stderr.contains("disconnected"),
        "{stderr}"
    );
    let copy = repo.path("copy");
    common::mount::wait_until("the export to be served again", std::time::Duration::from_secs(60), || {
        std::process::Command::new("nbdcopy")
            .args([&srv.url(&v), copy.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert_eq!(sha256_file(&copy), sha256_file(&repo.path("img")));
    let (status, log) = srv.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("stopped answering"), "the server's log says why: {log}");
}

/// A mount's commit waits for the catalog's write lock (held by another client) when the
/// server is stopped; the commit is given up. Its connection must be closed then, not
/// when the mount next connects: otherwise the server, once resumed, grants the lock to
/// that connection's transaction, which nobody will ever finish, and every other
/// writer's `lock_timeout` runs out behind it (a review found the socket left open).
#[test]
fn a_given_up_transaction_holds_no_lock_once_the_server_resumes() {
    let pg = PgServer::start();
    let db = pg.create_db("givenup");
    let url = pg.url(&db);
    let repo = config_repo(&format!("{url}?connect_timeout=2"));
    std::fs::write(repo.path("img"), mixed_image(70, 4, BS, 0)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let cfg = repo.config_file();
    let dir = repo.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = common::mount::Mount::at_with_env(
        &repo,
        &dir,
        &["--config", &cfg],
        &[("KEEPFS_TEST_CATALOG_PATIENCE_MS", "1000")],
    );
    // A file written into incoming/, closed once the lock is held: its commit (at the
    // release) waits for the lock.
    let mut file = std::fs::File::create(m.p("incoming/locked")).unwrap();
    std::io::Write::write_all(&mut file, &mixed_image(71, 4, BS, 0)).unwrap();
    let held = common::pg::WriteLockHeld::take(&url);
    std::thread::spawn(move || drop(file));
    pg.wait_for_a_lock_waiter("the commit to wait for the lock");
    let stopped = pg.stop_processes();
    common::mount::wait_until("the commit to be given up", std::time::Duration::from_secs(120), || {
        m.log_text().contains("stopped answering")
    });
    drop(stopped);
    held.release();
    // The given-up connection was first in the lock's queue: once the server reads on it
    // finds that connection closed and ends its transaction, so another writer gets the
    // lock within a lock_timeout of 3 s (with the socket left open, the server granted
    // it to that transaction, which held it until the mount next reconnected).
    let quick = repo.path("quick.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&quick, text.replace("connect_timeout=2", "connect_timeout=2&options=-c%20lock_timeout%3D3000"))
        .unwrap();
    let r = repo.run(&["--config", quick.to_str().unwrap(), "label", &v, "k=v"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, m.log_text());
    let left =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keepfs' AND state LIKE 'idle in transaction%'";
    assert_eq!(pg.psql(left), "0");
    m.unmount();
}
