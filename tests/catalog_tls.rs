//! TLS to the PostgreSQL catalog, as a user meets it: a repository whose `database` URL
//! says `sslmode=verify-full&sslrootcert=ca.pem`, on a real PostgreSQL server that
//! accepts TCP connections only over TLS (`hostssl` lines alone in pg_hba.conf, so a
//! connection that works was encrypted), and the ways it is misconfigured: a CA that did
//! not sign the server's certificate, a host the certificate does not name, a server
//! without TLS under `sslmode=require`, a mode keepfs does not know; and a server that
//! authenticates by client certificate (`sslcert`, `sslkey`).

mod common;
use common::pg::PgServer;
use common::*;

const BS: usize = 64 * 1024;

/// A repository in a temporary directory whose catalog is `database`, through a
/// configuration file, as a user sets it up.
fn config_repo(database: &str) -> Repo {
    Repo::with_database(database, "", "")
}

/// `keepfs ls` of `repo` with `database` as its catalog: the exit code and the one
/// error line (checked to be the only line on stderr when it fails).
fn ls_with(repo: &Repo, database: &str) -> (i32, String) {
    repo.set_database(database, "", "");
    let r = repo.run_cfg(&["ls"]);
    eprintln!("keepfs ls on {database}: exit {}: {}", r.code, r.error_line());
    if r.code != 0 {
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    }
    (r.code, r.error_line().to_string())
}

fn sha256_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A user's session over verified TLS: backups (the second deduplicated against the
/// first), restore byte-identical, rm + cleanup, all through a server that takes no
/// connection without TLS; the same URL with `sslmode=disable` is rejected by that
/// server, and a URL without `sslmode` (libpq's default, `prefer`) gets TLS.
#[test]
fn a_repository_on_postgresql_over_verified_tls_backs_up_restores_and_cleans_up() {
    let pg = PgServer::start_tls();
    let ca = pg.dir.path().join("ca.pem");
    let plain_url = pg.url(&pg.create_db("tls"));
    let url = format!("{plain_url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let repo = config_repo(&url);
    let img = random_bytes(3, 12 * BS + 100);
    std::fs::write(repo.path("img"), &img).unwrap();
    let src = repo.url("img");
    let v1 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k"]).trim().to_string();
    let mut img2 = img.clone();
    img2[..BS].copy_from_slice(&random_bytes(78, BS));
    std::fs::write(repo.path("img"), &img2).unwrap();
    let v2 = repo.ok_cfg(&["backup", &src, "vm", "-b", "64k"]).trim().to_string();
    let stored = repo.block_objects();

    let out = repo.path("out").display().to_string();
    repo.ok_cfg(&["restore", &v1, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_bytes(&img));
    repo.ok_cfg(&["rm", "--force", &v1]);
    let done = repo.ok_cfg(&["cleanup"]);
    assert!(done.contains("deleted 1 object(s)"), "{done}");
    assert_eq!(repo.block_objects(), stored - 1, "only the block no other version has is gone");
    std::fs::remove_file(repo.path("out")).unwrap();
    repo.ok_cfg(&["restore", &v2, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_bytes(&img2));
    assert_eq!(pg.psql_in("tls", "SELECT COUNT(*) FROM versions"), "1");

    // The server takes TCP connections only over TLS: the same database without TLS is
    // refused, so the connections above were encrypted.
    let (code, line) = ls_with(&repo, &format!("{plain_url}?sslmode=disable"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("no encryption") && line.contains("sslmode=require"), "{line}");
    // No sslmode: `prefer`, as psql does; this server offers TLS, so it is used.
    let (code, line) = ls_with(&repo, &plain_url);
    assert_eq!(code, 0, "{line}");
}

/// The certificate checks: a CA that did not sign the server's certificate is refused,
/// a host the certificate does not name is refused under `verify-full` and accepted
/// under `verify-ca` (which checks the chain only), each failure one line with exit
/// code 2 (the configuration is to fix) saying what to do.
#[test]
fn a_certificate_from_another_ca_or_for_another_host_is_refused_in_one_line() {
    let pg = PgServer::start_tls();
    let ca = pg.dir.path().join("ca.pem");
    let other_ca = pg.make_ca("other-ca");
    let db = pg.create_db("certs");
    let url = pg.url(&db);
    let repo = config_repo(&url);

    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=verify-full&sslrootcert={}", other_ca.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("not trusted") && line.contains("sslrootcert="), "{line}");
    assert!(!line.contains(common::pg::PASSWORD), "the password is never printed: {line}");

    // 127.0.0.2 reaches the same server; its certificate names 127.0.0.1 and localhost.
    let other_host = url.replace("127.0.0.1", "127.0.0.2");
    let (code, line) = ls_with(&repo, &format!("{other_host}?sslmode=verify-full&sslrootcert={}", ca.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("does not name the host") && line.contains("verify-ca"), "{line}");
    let (code, line) = ls_with(&repo, &format!("{other_host}?sslmode=verify-ca&sslrootcert={}", ca.display()));
    assert_eq!(code, 0, "verify-ca checks the chain, not the name: {line}");
    // verify-ca still checks the chain.
    let (code, line) = ls_with(&repo, &format!("{other_host}?sslmode=verify-ca&sslrootcert={}", other_ca.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("not trusted"), "{line}");
    // `require` encrypts without checking, as libpq's.
    let (code, line) = ls_with(&repo, &format!("{other_host}?sslmode=require"));
    assert_eq!(code, 0, "{line}");

    // Verifying needs a CA to verify with; a mode keepfs does not know is named.
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=verify-full"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("sslrootcert="), "{line}");
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=verify"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("sslmode=verify is not a mode") && line.contains("verify-full"), "{line}");
    assert_eq!(pg.psql_in(&db, "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'versions'"), "1");
}

/// `sslmode=require` against a server without TLS: refused in one line (exit 2) that says
/// to turn TLS on at the server or to use `prefer`; `prefer` then works in plain.
#[test]
fn sslmode_require_against_a_server_without_tls_is_refused_in_one_line() {
    let pg = PgServer::start();
    let url = pg.url(&pg.create_db("plain"));
    let repo = config_repo(&url);
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=require"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("does not offer TLS") && line.contains("sslmode=prefer"), "{line}");
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=prefer"));
    assert_eq!(code, 0, "{line}");
}

/// A server that offers TLS but whose pg_hba.conf takes this client only without it
/// (`hostnossl`): the default, `prefer`, connects in plain as psql does (tries TLS, is
/// refused, tries again without), so a repository that worked before keeps working;
/// `require` is refused in one line (exit 2) that names both ways out.
#[test]
fn prefer_falls_back_to_plain_where_the_server_refuses_tls_for_this_client() {
    let pg = PgServer::start_tls_with_hba("hostnossl all all 127.0.0.1/32 scram-sha-256");
    let url = pg.url(&pg.create_db("nossl"));
    let repo = config_repo(&url);
    std::fs::write(repo.path("img"), random_bytes(4, 3 * BS + 5)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let out = repo.path("out").display().to_string();
    repo.ok_cfg(&["restore", &v, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img")));
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=prefer"));
    assert_eq!(code, 0, "{line}");
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=require"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("only without TLS") && line.contains("hostssl"), "{line}");
}

/// A server that authenticates by client certificate (`cert` in pg_hba.conf, the
/// certificate's common name is the user): with `sslcert` and `sslkey` a repository
/// backs up and restores; without a certificate, with a key others may read, with a
/// certificate from a CA the server does not trust or for another user, and with a key
/// but no certificate, one line each (exit 2) that says what to do.
#[test]
fn a_server_that_wants_a_client_certificate_gets_the_one_sslcert_and_sslkey_name() {
    let pg = PgServer::start_tls_with_hba("hostssl all all 127.0.0.0/8 cert");
    let ca = pg.dir.path().join("ca.pem");
    let (cert, key) = pg.make_client_cert("client", common::pg::USER, "ca");
    // No password: the certificate is the credential.
    let base = pg.url_with(&pg.create_db("cert"), "");
    let tls = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let url = format!("{base}?{tls}&sslcert={}&sslkey={}", cert.display(), key.display());
    let repo = config_repo(&url);
    let img = random_bytes(5, 7 * BS + 3);
    std::fs::write(repo.path("img"), &img).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();
    let out = repo.path("out").display().to_string();
    repo.ok_cfg(&["restore", &v, &format!("file://{out}")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_bytes(&img));
    assert_eq!(pg.psql_in("cert", "SELECT COUNT(*) FROM versions"), "1");

    let (code, line) = ls_with(&repo, &format!("{base}?{tls}"));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("sslcert=FILE&sslkey=FILE"), "no certificate: {line}");

    let (other_cert, other_key) = pg.make_client_cert("stranger", common::pg::USER, &{
        pg.make_ca("other-ca");
        "other-ca".to_string()
    });
    let (code, line) =
        ls_with(&repo, &format!("{base}?{tls}&sslcert={}&sslkey={}", other_cert.display(), other_key.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("did not accept the client certificate") && line.contains("CA"), "{line}");

    let (someone_cert, someone_key) = pg.make_client_cert("someone", "someone-else", "ca");
    let (code, line) =
        ls_with(&repo, &format!("{base}?{tls}&sslcert={}&sslkey={}", someone_cert.display(), someone_key.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("common name is the user name"), "a certificate for another user: {line}");

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, line) = ls_with(&repo, &url);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("may be read by others") && line.contains("chmod"), "{line}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let (code, line) = ls_with(&repo, &format!("{base}?{tls}&sslkey={}", key.display()));
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("no sslcert"), "{line}");
    let (code, line) = ls_with(&repo, &url);
    assert_eq!(code, 0, "the right certificate still works: {line}");
}

/// A server whose TLS handshake fails (it speaks only TLS 1.0 and 1.1, which keepfs
/// does not): `prefer` connects without TLS, as libpq does. A statement that waits
/// longer than the patience (a lock another client holds) is then checked with a second
/// connection made the same way, without TLS, which the server answers: the statement
/// goes on waiting, and finishes once the lock is let go. (A check over TLS would fail
/// its handshake and give the statement up as if the server had stopped answering.)
#[test]
fn a_connection_made_without_tls_after_a_failed_handshake_is_checked_without_tls() {
    let pg = PgServer::start_tls_with_hba("host all all 127.0.0.1/32 scram-sha-256");
    for setting in
        ["ssl_min_protocol_version = 'TLSv1'", "ssl_max_protocol_version = 'TLSv1.1'", "log_connections = on"]
    {
        pg.psql(&format!("ALTER SYSTEM SET {setting}"));
    }
    pg.psql("SELECT pg_reload_conf()");
    let url = pg.url(&pg.create_db("oldtls"));
    let repo = config_repo(&url);
    // The handshake fails: `require` is refused, in one line.
    let (code, line) = ls_with(&repo, &format!("{url}?sslmode=require"));
    assert_eq!(code, 2, "{line}");
    repo.set_database(&format!("{url}?sslmode=prefer&connect_timeout=2"), "", "");
    std::fs::write(repo.path("img"), random_bytes(6, 3 * BS + 1)).unwrap();
    let v = repo.ok_cfg(&["backup", &repo.url("img"), "vm", "-b", "64k"]).trim().to_string();

    let (held, mut child) = pg.label_behind_the_write_lock(&repo, &url, &v);
    // Connections of user keepfs the server let in (log_connections): the checks.
    let log = pg.dir.path().join("log");
    let let_in = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("connection authorized: user=keepfs"))
            .count()
    };
    let before = let_in();
    common::mount::wait_until("two checks of the waiting statement", std::time::Duration::from_secs(60), || {
        let_in() >= before + 2 || child.try_wait().unwrap().is_some()
    });
    assert!(child.try_wait().unwrap().is_none(), "the label gave up while the server answered");
    held.release();
    let out = wait_output_within(child, COMMAND_LIMIT, "the label");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let ls: serde_json::Value = serde_json::from_str(&repo.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(ls[0]["labels"]["k"], "v", "{ls}");
}
