//! Losing the metadata database: the storage alone is enough. Delete the database,
//! `keepfs database rebuild`, and every version is back with its fields and labels,
//! restores byte for byte, and deduplication goes on.

mod common;
use common::*;
use std::fs;

#[test]
fn the_database_is_rebuilt_from_the_storage() {
    if sqlite_only("losing the database file") {
        return;
    }
    let repo = Repo::new();
    let bs = 64 * 1024;
    let imgs = [mixed_image(401, 30, bs, 10), mixed_image(402, 12, bs, 0), vec![0u8; 3 * bs]];
    let mut uids = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        fs::write(repo.path(&format!("img{i}")), img).unwrap();
        uids.push(repo.backup(&format!("img{i}"), &format!("vm{}", i % 2), &["-b", "64k", "-l", &format!("n={i}")]));
    }
    repo.ok(&["protect", &uids[1]]);
    repo.ok(&["label", &uids[0], "env=prod"]);
    repo.ok(&["expire", &uids[2], "2030-01-01"]);
    let before = repo.ls_json(None);
    let objects = repo.block_objects();

    // A rebuild refuses a database that still holds versions.
    let r = repo.run(&["database", "rebuild"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("move this one away"), "{}", r.stderr);

    for f in ["keepfs.sqlite", "keepfs.sqlite-wal", "keepfs.sqlite-shm"] {
        let _ = fs::remove_file(repo.home().join(f));
    }
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 0);
    let r = repo.run(&["database", "rebuild"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("3 version(s), {objects} object(s)")), "{}", r.stderr);

    let after = repo.ls_json(None);
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_array_mut().unwrap().iter_mut().for_each(|x| {
            x.as_object_mut().unwrap().remove("stats");
        });
        v
    };
    assert_eq!(strip(&after), strip(&before), "fields, labels, protection and expiry come back");
    for (i, uid) in uids.iter().enumerate() {
        assert_eq!(repo.restore_sha(uid, "o"), sha256_file(&repo.path(&format!("img{i}"))), "{uid}");
    }
    // New uids continue after the rebuilt ones, and nothing already stored is stored again.
    let next = repo.backup("img0", "vm0", &["-b", "64k"]);
    assert!(next > uids[2], "{next} after {}", uids[2]);
    assert_eq!(repo.version(&next)["stats"]["bytes_written"], 0);
    assert_eq!(repo.block_objects(), objects);
    // And cleanup, with every object referenced, deletes nothing.
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
}

#[test]
fn metadata_export_and_import() {
    let repo = Repo::new();
    let a = mixed_image(411, 10, 64 * 1024, 3);
    fs::write(repo.path("a"), &a).unwrap();
    let v1 = repo.backup("a", "m", &["-b", "64k", "-l", "env=prod", "-s", "s1"]);
    let v2 = repo.backup("a", "n", &["-b", "64k"]);
    let out = repo.path("meta.json");
    // The indexes are copied out in pieces of 97 bytes (debug builds), checked as they pass.
    let r =
        repo.run_env(&["metadata", "export", &v1, &v2, out.to_str().unwrap()], &[("KEEPFS_TEST_INDEX_PIECE", "97")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(doc["format"], "keepfs-metadata");
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["versions"].as_array().unwrap().len(), 2);
    let before = repo.ls_json(None);

    // Importing what exists is refused, as a whole.
    let r = repo.run(&["metadata", "import", out.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("exists already"), "{}", r.stderr);

    // Remove the versions (their blocks stay until cleanup), import them back.
    repo.ok(&["rm", "--force", &v1, &v2]);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 0);
    let imported = repo.ok(&["metadata", "import", out.to_str().unwrap()]);
    assert_eq!(imported.lines().collect::<Vec<_>>(), vec![v1.as_str(), v2.as_str()]);
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_array_mut().unwrap().iter_mut().for_each(|x| {
            x.as_object_mut().unwrap().remove("stats");
        });
        v
    };
    assert_eq!(strip(&repo.ls_json(None)), strip(&before));
    assert_eq!(repo.restore_sha(&v1, "o"), sha256_file(&repo.path("a")));
    assert!(repo.storage().join("versions").join(&v2).exists(), "the storage copy is written again");

    // Damaged or foreign documents are one-line errors.
    let mut bad = doc.clone();
    bad["format_version"] = 9.into();
    fs::write(repo.path("bad.json"), bad.to_string()).unwrap();
    fs::write(repo.path("junk.json"), "{ not json").unwrap();
    let mut tampered = doc.clone();
    let idx = tampered["versions"][0]["index"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", &idx[..idx.len() - 1], if idx.ends_with('0') { '1' } else { '0' });
    tampered["versions"][0]["index"] = flipped.into();
    tampered["versions"][0]["uid"] = "V0000000077".into();
    fs::write(repo.path("tampered.json"), tampered.to_string()).unwrap();
    for (f, needle) in
        [("bad.json", "format 9"), ("junk.json", "not a keepfs metadata document"), ("tampered.json", "checksum")]
    {
        let r = repo.run(&["metadata", "import", repo.path(f).to_str().unwrap()]);
        assert_eq!(r.code, 2, "{f}: {}", r.stderr);
        assert!(r.error_line().contains(needle) && r.stderr.lines().count() == 1, "{f}: {}", r.stderr);
    }
}

/// `metadata import` reads its document as a stream (each index decoded from hex into a
/// spool file as it passes): any valid JSON of the document's shape is taken (keys in
/// any order, the index before the fields, upper-case hex, unknown members, from
/// standard input), and a document cut short or with bad hex anywhere is a one-line
/// error with nothing imported and nothing left in the spool.
#[test]
fn metadata_import_reads_its_document_as_a_stream() {
    let repo = Repo::new();
    let a = mixed_image(421, 12, 64 * 1024, 5);
    fs::write(repo.path("a"), &a).unwrap();
    let v1 = repo.backup("a", "m", &["-b", "64k", "-l", "k=v"]);
    let v2 = repo.backup("a", "n", &["-b", "64k"]);
    let out = repo.path("meta.json");
    repo.ok(&["metadata", "export", &v1, &v2, out.to_str().unwrap()]);
    let text = fs::read_to_string(&out).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let before = repo.ls_json(None);
    repo.ok(&["rm", "--force", &v1, &v2]);
    let spool_empty = || files_under(&repo.home().join("spool")).is_empty();

    // Written by hand: the index first and in upper case, fields after it, members keepfs
    // does not know, the format last.
    let mut hand = String::from("{\"comment\": [1, {\"x\": null}], \"versions\": [");
    for (n, v) in doc["versions"].as_array().unwrap().iter().enumerate() {
        let mut fields = v.as_object().unwrap().clone();
        let index = fields.remove("index").unwrap();
        hand.push_str(if n == 0 { "\n {" } else { ",\n {" });
        hand.push_str(&format!("\"index\" : \"{}\"", index.as_str().unwrap().to_uppercase()));
        for (k, val) in fields {
            hand.push_str(&format!(", {}: {val}", serde_json::Value::from(k)));
        }
        hand.push('}');
    }
    hand.push_str("],\n\"format_version\": 1, \"format\": \"keepfs-metadata\"}\n");
    // One more digit at the end of the first index (the index is the last member).
    let index_at = text.find("\"index\":\"").unwrap() + "\"index\":\"".len();
    let index_end = index_at + text[index_at..].find('"').unwrap();
    let odd = format!("{}0{}", &text[..index_end], &text[index_end..]);
    let cases = [
        ("cut short inside an index", text[..text.len() / 2].to_string(), "not a keepfs metadata document"),
        ("an odd number of digits", odd, "not hex"),
        ("a digit shifted in at the start", text.replacen("\"index\":\"", "\"index\":\"0", 1), "damaged"),
        ("a digit that is not hex", text.replacen("\"index\":\"", "\"index\":\"zz", 1), "not hex"),
        ("something after the document", format!("{text} []"), "not a keepfs metadata document"),
        ("a version without its index", text.replacen("\"index\":", "\"index_was\":", 1), "holds no index"),
    ];
    for (what, bad, needle) in cases {
        let path = repo.path("bad.json");
        fs::write(&path, &bad).unwrap();
        let r = repo.run(&["metadata", "import", path.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert!(r.error_line().contains(needle) && r.stderr.lines().count() == 1, "{what}: {}", r.stderr);
        assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 0, "{what}: nothing imported");
        assert!(spool_empty(), "{what}: the spool is empty again");
    }

    // From standard input, the hand-written one.
    let mut child = repo
        .command(&["metadata", "import", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(hand.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().collect::<Vec<_>>(), vec![v1.as_str(), v2.as_str()]);
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_array_mut().unwrap().iter_mut().for_each(|x| {
            x.as_object_mut().unwrap().remove("stats");
        });
        v
    };
    assert_eq!(strip(&repo.ls_json(None)), strip(&before));
    assert!(spool_empty());
    assert_eq!(repo.restore_sha(&v2, "o"), sha256_file(&repo.path("a")));
    let r = repo.run(&["deep-scrub", &v1]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// Versions with chosen dates, made by importing edited metadata of a real version.
#[test]
fn enforce_removes_what_retention_rules_do_not_keep() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(421, 4, 64 * 1024, 0)).unwrap();
    let seed = repo.backup("a", "db", &["-b", "64k"]);
    let out = repo.path("m.json");
    repo.ok(&["metadata", "export", &seed, out.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    let template = doc["versions"][0].clone();
    repo.ok(&["rm", "--force", &seed]);
    // Ten daily versions of db (uid 11 newest), one protected, and an old one of web.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut versions = Vec::new();
    for i in 0..10i64 {
        let mut v = template.clone();
        let uid = 20 - i;
        v["uid"] = format!("V{uid:010}").into();
        v["date"] = iso(now - i * 86_400 - 60);
        v["protected"] = (uid == 13).into();
        let idx = v["index"].as_str().unwrap().to_string();
        v["index"] = reindex(&idx, uid as u64).into();
        versions.push(v);
    }
    let mut web = template.clone();
    web["uid"] = "V0000000030".into();
    web["name"] = "web".into();
    web["date"] = iso(now - 400 * 86_400);
    web["index"] = reindex(template["index"].as_str().unwrap(), 30).into();
    versions.push(web);
    let doc = serde_json::json!({"format": "keepfs-metadata", "format_version": 1, "versions": versions});
    fs::write(repo.path("many.json"), doc.to_string()).unwrap();
    repo.ok(&["metadata", "import", repo.path("many.json").to_str().unwrap()]);

    let plan = repo.ok(&["enforce", "latest2,days4", "name == \"db\"", "--dry-run"]);
    let planned: Vec<&str> = plan.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
    // Kept: latest2 (V20, V19), days4 (oldest per day: V20..V17 one each), V13 protected.
    assert_eq!(planned, vec!["V0000000011", "V0000000012", "V0000000014", "V0000000015", "V0000000016"]);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 11, "a dry run removes nothing");
    repo.ok(&["enforce", "latest2,days4", "name == \"db\""]);
    let left: Vec<String> =
        repo.ls_json(None).as_array().unwrap().iter().map(|v| v["uid"].as_str().unwrap().to_string()).collect();
    assert_eq!(left, vec!["V0000000013", "V0000000017", "V0000000018", "V0000000019", "V0000000020", "V0000000030"]);
    let r = repo.run(&["enforce", "fortnights2"]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("unknown category 'fortnights'"), "{}", r.stderr);
}

fn iso(secs: i64) -> serde_json::Value {
    let d = chrono::DateTime::from_timestamp(secs, 0).unwrap();
    d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into()
}

/// The same index under another uid (the uid is part of the index and its checksum).
fn reindex(hex_index: &str, uid: u64) -> String {
    let mut index = keepfs::index::BlockIndex::decode(&hex::decode(hex_index).unwrap()).unwrap();
    index.uid = uid;
    hex::encode(index.encode().unwrap())
}

/// `metadata backup` writes lost metadata objects again; `metadata restore` brings
/// versions the database lost (here: an older copy of the database put back) from them.
#[test]
fn metadata_backup_and_restore_through_the_storage() {
    if sqlite_only("editing the database file") {
        return;
    }
    let repo = Repo::new();
    let a = mixed_image(431, 6, 64 * 1024, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let v1 = repo.backup("a", "m", &["-b", "64k"]);
    let db = repo.home().join("keepfs.sqlite");
    // A copy of the database as it is now (SQLite's own backup: consistent under WAL).
    let saved = repo.path("saved.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("VACUUM INTO ?1", [saved.to_str().unwrap()]).unwrap();
    drop(conn);
    fs::write(repo.path("b"), mixed_image(432, 5, 64 * 1024, 7)).unwrap();
    let v2 = repo.backup("b", "n", &["-b", "64k", "-l", "k=v"]);

    // A lost metadata object comes back with `metadata backup`.
    let obj = repo.storage().join("versions").join(&v1);
    fs::remove_file(&obj).unwrap();
    repo.ok(&["metadata", "backup", "name == \"m\""]);
    assert!(obj.exists());

    // The database goes back to the saved copy: v2 is unknown to it, but not to the storage.
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }
    fs::copy(&saved, &db).unwrap();
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1);
    // Until it is told, keepfs refuses what would overwrite or orphan v2.
    for (args, needle) in [
        (vec!["cleanup"], format!("holds version(s) {v2} that the database does not know")),
        (vec!["backup", &repo.url("a"), "m", "-b", "64k"], format!("already holds version {v2}")),
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains(&needle), "{args:?}: {}", r.stderr);
    }
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "the refused backup left nothing");
    assert_eq!(repo.ok(&["metadata", "restore", &v2]).trim(), v2);
    let back = repo.version(&v2);
    assert_eq!(back["status"], "valid");
    assert_eq!(back["labels"]["k"], "v");
    assert_eq!(repo.restore_sha(&v2, "o"), sha256_file(&repo.path("b")));

    for (args, needle) in [
        (vec!["metadata", "restore", v1.as_str()], "in the database already"),
        (vec!["metadata", "restore", "V0000000099"], "no storage holds metadata of version V0000000099"),
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains(needle), "{args:?}: {}", r.stderr);
    }
}

/// The database is lost and one version object in the storage has a flipped bit: the
/// rebuild skips that one (naming it, exit 3), rebuilds every other version, can be run
/// again, and once the object is written again from a database that still holds it
/// (`metadata backup` with an older copy), a last rebuild brings the version back.
#[test]
fn a_rebuild_skips_a_damaged_version_object_and_can_be_run_again() {
    if sqlite_only("editing the database file") {
        return;
    }
    let repo = Repo::new();
    let bs = 64 * 1024;
    let mut uids = Vec::new();
    for i in 0..3u64 {
        fs::write(repo.path(&format!("img{i}")), mixed_image(441 + i, 10, bs, 5)).unwrap();
        uids.push(repo.backup(&format!("img{i}"), &format!("vm{i}"), &["-b", "64k", "-l", &format!("n={i}")]));
    }
    let (a, b, c) = (&uids[0], &uids[1], &uids[2]);
    let db = repo.db_file();
    let saved = repo.path("saved.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("VACUUM INTO ?1", [saved.to_str().unwrap()]).unwrap();
    drop(conn);
    let objects = repo.block_objects();

    let object = repo.storage().join("versions").join(b);
    flip_bit(&object, fs::metadata(&object).unwrap().len() / 2, 0x01);
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }

    let r = repo.run(&["database", "rebuild"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("2 version(s)"), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("keepfs: damaged: storage 'default' object versions/{b}: ")), "{}", r.stderr);
    assert!(r.error_line().contains(&format!("keepfs metadata backup 'uid == \"{b}\"'")), "{}", r.stderr);
    let listed: Vec<String> =
        repo.ls_json(None).as_array().unwrap().iter().map(|v| v["uid"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, vec![a.clone(), c.clone()]);
    assert_eq!(repo.restore_sha(a, "o"), sha256_file(&repo.path("img0")));
    assert_eq!(repo.restore_sha(c, "o"), sha256_file(&repo.path("img2")));

    // Run again: what is there stays, the damaged one is named again.
    let r = repo.run(&["database", "rebuild"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("0 version(s) (2 there already)"), "{}", r.stderr);
    // Cleanup will not delete the blocks only the damaged version names.
    let r = repo.run(&["cleanup"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains(b.as_str()), "{}", r.stderr);
    assert_eq!(repo.block_objects(), objects);

    // The repair the message names, with the saved copy of the database.
    let config = repo.path("old.toml");
    fs::write(&config, format!("home = {:?}\ndatabase = {:?}\n", repo.home(), saved)).unwrap();
    repo.ok(&["--config", config.to_str().unwrap(), "metadata", "backup", &format!("uid == \"{b}\"")]);
    let r = repo.run(&["database", "rebuild"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("1 version(s) (2 there already)"), "{}", r.stderr);
    assert_eq!(repo.version(b)["labels"]["n"], "1");
    assert_eq!(repo.restore_sha(b, "o"), sha256_file(&repo.path("img1")));
    // Finished cleanly: the database is a live one again, and a rebuild refuses it.
    assert_eq!(repo.run(&["database", "rebuild"]).code, 4);
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
}

/// Pages of the SQLite file overwritten (a stray `dd`, a failing disk): every command
/// says so in one line and names the way out; `database rebuild --replace-damaged` keeps
/// the damaged file under a new name and rebuilds the database from the storage.
#[test]
fn a_damaged_database_file_is_moved_aside_and_rebuilt() {
    if sqlite_only("a damaged database file") {
        return;
    }
    let repo = Repo::new();
    let bs = 64 * 1024;
    let mut uids = Vec::new();
    for i in 0..2u64 {
        fs::write(repo.path(&format!("img{i}")), mixed_image(451 + i, 10, bs, 0)).unwrap();
        uids.push(repo.backup(&format!("img{i}"), &format!("vm{i}"), &["-b", "64k"]));
    }
    repo.checkpoint_db();
    let db = repo.db_file();
    let mut bytes = fs::read(&db).unwrap();
    let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    assert!(bytes.len() > 2 * page, "more than one page");
    // Every page after the first (the header and the schema's root stay).
    let garbage = random_bytes(9, bytes.len() - page);
    bytes[page..].copy_from_slice(&garbage);
    fs::write(&db, &bytes).unwrap();
    let damaged_sha = sha256_file(&db);

    for args in [vec!["ls"], vec!["backup", "null://1M", "x"], vec!["database", "rebuild"]] {
        let r = repo.run(&args);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains("keepfs database rebuild --replace-damaged"), "{args:?}: {}", r.stderr);
    }

    let r = repo.run(&["database", "rebuild", "--replace-damaged"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is damaged") && r.stderr.contains("moved it to"), "{}", r.stderr);
    assert!(r.stderr.contains("2 version(s)"), "{}", r.stderr);
    let aside: Vec<_> = files_under(&repo.home())
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("keepfs.sqlite.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(sha256_file(&aside[0]), damaged_sha, "the damaged file is kept as it was");
    for (i, uid) in uids.iter().enumerate() {
        assert_eq!(repo.restore_sha(uid, "o"), sha256_file(&repo.path(&format!("img{i}"))), "{uid}");
    }
    // An intact database is never moved: the flag changes nothing, the rebuild refuses.
    let r = repo.run(&["database", "rebuild", "--replace-damaged"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(files_under(&repo.home()).iter().filter(|p| p.to_string_lossy().contains(".damaged-")).count(), 1);
}
