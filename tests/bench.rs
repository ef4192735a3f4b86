//! `keepfs bench` as an operator runs it before sizing a backup host: it measures the CPU
//! work of a backup and the configured storage, prints each figure next to a reference,
//! gives the same as JSON, and leaves nothing behind in the storage. (No figure is
//! asserted: speed belongs in contrib/bench/, not in tests.)

mod common;
use common::*;

#[test]
fn bench_reports_every_figure_with_its_reference_and_cleans_up() {
    let repo = Repo::new();
    let out = repo.ok(&["bench", "--format", "json", "--seconds", "0.05", "--size", "8M"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let rows = v["results"].as_array().expect("results");
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(
        tests,
        ["sha256", "zstd_compress", "zstd_decompress", "aes256_gcm", "storage_write", "storage_read"],
        "{v}"
    );
    for r in rows {
        assert!(r["bytes_per_second"].as_f64().expect("a rate") > 0.0, "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
        let reference = r["reference_bytes_per_second"].as_f64().expect("a reference");
        let pct = r["percent_of_reference"].as_f64().expect("a percentage");
        assert!((pct - r["bytes_per_second"].as_f64().unwrap() / reference * 100.0).abs() < 1e-6, "{r}");
        assert!(!r["reference"].as_str().unwrap().is_empty(), "{r}");
    }
    assert_eq!(rows[4]["storage"], "default");
    assert_eq!(rows[4]["bytes"], 8 << 20, "whole blocks of 4 MiB");
    assert_eq!(rows[5]["bytes"], 8 << 20, "everything written was read back");
    // The benchmark's objects are gone.
    let left: Vec<_> =
        files_under(&repo.storage()).into_iter().filter(|p| p.to_string_lossy().contains("bench")).collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // The table: one row per figure, the reference and the percentage beside it.
    let table = repo.ok(&["bench", "--cpu-only", "--seconds", "0.05"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("test") && lines[0].contains("this host") && lines[0].contains("reference"),
        "{table}"
    );
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines[1].starts_with("SHA-256") && lines[1].contains(" MB/s") && lines[1].ends_with('%'), "{table}");

    // Mistakes are one line, exit 2.
    let r = repo.run(&["bench", "-S", "nosuch", "--seconds", "0.05"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("nosuch"), "{}", r.stderr);
    let r = repo.run(&["bench", "--seconds", "0"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
