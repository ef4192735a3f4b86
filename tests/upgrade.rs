//! A catalog an older keepfs left, as a user upgrading keepfs meets it: the first command
//! of the new binary brings the schema to this keepfs's version in one transaction, on
//! either engine (this file runs on SQLite, and on PostgreSQL under
//! `KEEPFS_TEST_POSTGRES`); a step the database refuses leaves the catalog exactly as it
//! was, with one line that says so.

mod common;
use common::*;

/// Takes the repository's catalog back to schema version 1, as the first keepfs made it:
/// the tables and columns migrations 2 to 6 added are dropped (their contents with them),
/// and so is the storage's `owner` object, which no keepfs of that time wrote.
fn back_to_schema_1(repo: &Repo) {
    for sql in [
        "ALTER TABLE sessions DROP COLUMN machine",
        "ALTER TABLE objects DROP COLUMN deleter",
        "ALTER TABLE versions DROP COLUMN host",
        "DROP TABLE repository_state",
        "ALTER TABLE versions DROP COLUMN active_ms",
        "ALTER TABLE storages DROP COLUMN encrypted",
        "ALTER TABLE objects DROP COLUMN key_id",
    ] {
        repo.catalog_sql(sql);
    }
    if postgres_mode() {
        repo.catalog_sql("UPDATE keepfs_schema SET version = 1");
    } else {
        repo.catalog_sql("PRAGMA user_version = 1");
    }
    assert_eq!(repo.schema_version(), 1);
    std::fs::remove_file(repo.storage().join("owner")).unwrap();
}

#[test]
fn a_catalog_of_schema_1_is_upgraded_in_one_transaction_and_a_failed_step_changes_nothing() {
    let repo = Repo::new();
    let img = random_bytes(7, 5 * 64 * 1024 + 300);
    std::fs::write(repo.path("img"), &img).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    assert_eq!(repo.schema_version(), keepfs::catalog::SCHEMA_VERSION as i64);
    back_to_schema_1(&repo);

    // A table of the name step 4 creates is in the way (made by hand, say): step 4 fails
    // after steps 2 and 3 ran in the same transaction. Nothing of the upgrade stays.
    repo.catalog_sql("CREATE TABLE repository_state (made_by_hand INTEGER)");
    let r = repo.run(&["ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let errors: Vec<&str> = r.stderr.lines().collect();
    assert!(errors.len() == 1 && errors[0].starts_with("keepfs: error:"), "one error line: {}", r.stderr);
    for part in
        ["cannot upgrade", "from schema version 1 to 6", "step 4 failed", "repository_state", "nothing of the upgrade"]
    {
        assert!(errors[0].contains(part), "{part:?} missing: {}", r.stderr);
    }
    assert_eq!(repo.schema_version(), 1, "the schema version is as it was");
    let step_3_column = repo.catalog_query("SELECT count(active_ms) FROM versions");
    assert!(step_3_column.is_err(), "step 3's column was rolled back: {step_3_column:?}");
    assert!(!repo.storage().join("owner").exists(), "the failed command claimed the storage");

    // Out of the way, the next command upgrades: the version lists, restores byte for
    // byte and deduplicates the next backup; the storage is claimed for this catalog.
    repo.catalog_sql("DROP TABLE repository_state");
    let ls = repo.ls_json(None);
    assert_eq!((ls[0]["uid"].as_str(), ls[0]["status"].as_str()), (Some(v.as_str()), Some("valid")), "{ls}");
    assert_eq!(repo.schema_version(), keepfs::catalog::SCHEMA_VERSION as i64);
    assert_eq!(repo.restore_sha(&v, "out"), sha256_file(&repo.path("img")));
    let again = repo.backup("img", "vm", &["-b", "64k"]);
    assert_eq!(repo.version(&again)["stats"]["bytes_written"], 0, "{}", repo.version(&again));
    assert!(repo.storage().join("owner").exists());
    repo.ok(&["rm", "--force", &v]);
    repo.ok(&["cleanup"]);
    assert_eq!(repo.restore_sha(&again, "out"), sha256_file(&repo.path("img")));
    repo.ok(&["deep-scrub", &again]);
}
