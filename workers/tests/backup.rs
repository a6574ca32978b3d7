//! Backups end to end against a real Postgres and a `file://` store: back up, restore into a
//! new database or directory, compare; tamper; prune. Each test creates its own databases
//! and temp dirs, so tests run in parallel.

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use age::secrecy::ExposeSecret;
use chrono::{TimeZone, Utc};
use jobs::families::backup::Source;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use uuid::Uuid;
use workers::families::backup::{
    BackupConfig, BackupError, Backups, FilesTarget, NoProgress, PostgresTarget, Retention,
};

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn pg_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

async fn admin() -> DatabaseConnection {
    Database::connect(PG_ADMIN_URL).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    })
}

/// Databases created by a test, dropped when it ends (also when it fails).
struct Databases(Vec<String>);

impl Databases {
    async fn create(&mut self, tag: &str) -> String {
        let name = format!("drover_bk_{tag}_{}", Uuid::now_v7().simple());
        admin()
            .await
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.0.push(name.clone());
        name
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Drop runs outside the test's runtime: a small one of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = admin().await;
                for n in names {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// ~100k rows over three tables, with the types a real schema has (numeric, jsonb, bytea,
/// timestamps, NULLs), a foreign key, an index, a view and a sequence.
async fn fill(url: &str) {
    let db = Database::connect(url).await.unwrap();
    db.execute_unprepared(
        "CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL, balance numeric(12,2), created timestamptz NOT NULL);
         CREATE TABLE events (id bigint PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts(id), kind text, payload jsonb, at timestamptz);
         CREATE INDEX events_account_idx ON events(account_id, at);
         CREATE TABLE notes (id int PRIMARY KEY, body text, data bytea);
         CREATE VIEW rich AS SELECT * FROM accounts WHERE balance > 1000;
         INSERT INTO accounts (name, balance, created)
           SELECT 'acct-' || g, round((random() * 5000)::numeric, 2), now() - g * interval '1 minute'
           FROM generate_series(1, 10000) g;
         INSERT INTO events
           SELECT g, 1 + g % 10000, (ARRAY['login','buy','sell','logout'])[1 + g % 4],
                  jsonb_build_object('n', g, 'tag', md5(g::text)), now() - g * interval '1 second'
           FROM generate_series(1, 80000) g;
         INSERT INTO notes
           SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE repeat('note ' || g, 3) END, decode(md5(g::text), 'hex')
           FROM generate_series(1, 10000) g;",
    )
    .await
    .expect("fill the source database");
    db.close().await.unwrap();
}

/// Per table: row count and the md5 of all rows in primary-key order.
async fn fingerprint(url: &str) -> BTreeMap<String, (i64, String)> {
    use sea_orm::sqlx::{Connection, Row, postgres::PgConnection};
    let mut conn = PgConnection::connect(url).await.unwrap();
    let mut out = BTreeMap::new();
    for table in ["accounts", "events", "notes"] {
        let row = sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(format!(
            "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        out.insert(table.to_owned(), (row.get::<i64, _>(0), row.get::<String, _>(1)));
    }
    let next: i64 = sea_orm::sqlx::query_scalar("SELECT nextval('accounts_id_seq')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    out.insert("accounts_id_seq".into(), (next, String::new()));
    conn.close().await.unwrap();
    out
}

struct Setup {
    backups: Backups,
    catalog: DatabaseConnection,
    store_dir: tempfile::TempDir,
    identity: Option<tempfile::NamedTempFile>,
}

/// A catalog database, a file store in a temp dir, and optionally an age identity.
async fn setup(dbs: &mut Databases, encrypted: bool, edit: impl FnOnce(&mut BackupConfig)) -> Setup {
    let catalog_name = dbs.create("catalog").await;
    let catalog = schema::connect(&pg_url(&catalog_name)).await.unwrap();
    schema::migrate(&catalog).await.unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let mut config = BackupConfig {
        store: store_dir.path().display().to_string(),
        drover_database: false,
        ..Default::default()
    };
    let identity = if encrypted {
        let id = age::x25519::Identity::generate();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{}", id.to_string().expose_secret()).unwrap();
        config.age_recipients = vec![id.to_public().to_string()];
        config.age_identity_file = Some(f.path().to_owned());
        Some(f)
    } else {
        None
    };
    edit(&mut config);
    let backups = Backups::new(catalog.clone(), config, None, "[effective]\nx = 1\n".into()).unwrap();
    Setup {
        backups,
        catalog,
        store_dir,
        identity,
    }
}

fn object_path(_s: &Setup, key: &str) -> PathBuf {
    // file:// stores keep keys relative to the filesystem root.
    PathBuf::from("/").join(key)
}

async fn postgres_round_trip(encrypted: bool) {
    let mut dbs = Databases(Vec::new());
    let source = dbs.create("source").await;
    fill(&pg_url(&source)).await;
    let s = setup(&mut dbs, encrypted, |c| {
        c.postgres.push(PostgresTarget {
            name: "app".into(),
            url: pg_url(&source),
        })
    })
    .await;
    let id = Uuid::now_v7();
    let row = s.backups.take(id, Source::Postgres, "app").await.expect("backup");
    assert_eq!(row.status, "succeeded");
    assert_eq!(row.encrypted, encrypted);
    assert!(row.object_key.ends_with(if encrypted {
        ".pgdump.zst.age"
    } else {
        ".pgdump.zst"
    }));
    assert!(
        row.object_key
            .starts_with(s.store_dir.path().strip_prefix("/").unwrap().to_str().unwrap())
    );
    let on_disk = std::fs::metadata(object_path(&s, &row.object_key)).unwrap().len();
    assert_eq!(Some(on_disk as i64), row.stored_bytes);
    let counts: BTreeMap<String, i64> = serde_json::from_value(row.table_counts.clone().unwrap()).unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("public.accounts".to_owned(), 10_000),
            ("public.events".to_owned(), 80_000),
            ("public.notes".to_owned(), 10_000)
        ])
    );
    if encrypted {
        // The object really is an age file: its plaintext header never reaches the store.
        let mut head = [0u8; 21];
        std::fs::File::open(object_path(&s, &row.object_key))
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(&head, b"age-encryption.org/v1");
    }

    let target = dbs.create("restored").await;
    let report = s
        .backups
        .restore(id, &pg_url(&target), &NoProgress)
        .await
        .expect("restore");
    assert_eq!(Some(report.plain_bytes as i64), row.source_bytes);
    let (want, got) = (
        fingerprint(&pg_url(&source)).await,
        fingerprint(&pg_url(&target)).await,
    );
    assert_eq!(want["events"].0, 80_000);
    assert_eq!(got, want, "the restored database differs from the source");

    let verified = s
        .backups
        .verify(id, true, &NoProgress)
        .await
        .expect("verify with a restore check");
    assert_eq!(verified.table_counts, Some(counts));
    let row = s.backups.get(id).await.unwrap();
    assert!(row.verified_at.is_some());
    drop(s.identity);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_backup_restores_into_a_new_database_with_identical_rows() {
    postgres_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_postgres_backup_restores_into_a_new_database_with_identical_rows() {
    postgres_round_trip(true).await;
}

/// A tree with what trips tar up: nesting, an empty directory, a symlink, binary and empty
/// files, a file larger than one multipart part, and files an exclude glob leaves out.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join("cache/deep")).unwrap();
    std::fs::write(root.join("a/hello.txt"), "hello\n").unwrap();
    std::fs::write(root.join("a/b/empty.bin"), b"").unwrap();
    let mut big = Vec::with_capacity(7 << 20);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while big.len() < (7 << 20) + 123 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(root.join("a/b/c/random.bin"), &big).unwrap();
    std::fs::write(root.join("a/b/c/text.csv"), "id,name\n".repeat(100_000)).unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("a/b/link")).unwrap();
    std::fs::write(root.join("cache/deep/skip.dat"), "x").unwrap();
    std::fs::write(root.join("a/debug.log"), "left out").unwrap();
}

/// Relative path → (kind, contents or link target), for every entry under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, Vec<u8>)> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_owned();
            let t = e.file_type();
            let v = if t.is_symlink() {
                (
                    'l',
                    std::fs::read_link(e.path())
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if t.is_dir() {
                ('d', Vec::new())
            } else {
                ('f', std::fs::read(e.path()).unwrap())
            };
            (rel, v)
        })
        .collect()
}

async fn files_round_trip(encrypted: bool) {
    let mut dbs = Databases(Vec::new());
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("uploads");
    make_tree(&root);
    let s = setup(&mut dbs, encrypted, |c| {
        c.files.push(FilesTarget {
            name: "uploads".into(),
            paths: vec![root.clone()],
            include: vec![],
            exclude: vec!["cache".into(), "**/*.log".into()],
        })
    })
    .await;
    let id = Uuid::now_v7();
    let row = s
        .backups
        .take(id, Source::Files, "uploads")
        .await
        .expect("backup");
    assert_eq!(row.status, "succeeded");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("restored");
    s.backups
        .restore(id, dest.to_str().unwrap(), &NoProgress)
        .await
        .expect("restore");
    let restored_root = dest.join(root.strip_prefix("/").unwrap());
    let mut want = snapshot(&root);
    want.retain(|p, _| !p.starts_with("cache") && p.extension().is_none_or(|e| e != "log"));
    assert!(want.contains_key(Path::new("a/b/c/random.bin")) && want.contains_key(Path::new("empty")));
    let got = snapshot(&restored_root);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    assert!(got == want, "restored tree is not byte-identical");
    // Restores never overwrite: the same directory again is refused.
    let again = s.backups.restore(id, dest.to_str().unwrap(), &NoProgress).await;
    assert!(matches!(again, Err(BackupError::Restore { .. })), "{again:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_files_backup_restores_a_byte_identical_tree() {
    files_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_files_backup_restores_a_byte_identical_tree() {
    files_round_trip(true).await;
}

async fn tamper(encrypted: bool) {
    let mut dbs = Databases(Vec::new());
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path());
    let root = tree.path().to_owned();
    let s = setup(&mut dbs, encrypted, |c| {
        c.files.push(FilesTarget {
            name: "t".into(),
            paths: vec![root],
            include: vec![],
            exclude: vec![],
        })
    })
    .await;
    let id = Uuid::now_v7();
    let row = s.backups.take(id, Source::Files, "t").await.unwrap();
    s.backups
        .verify(id, false, &NoProgress)
        .await
        .expect("an intact backup verifies");

    // Flip one bit in the middle of the object.
    let path = object_path(&s, &row.object_key);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[byte[0] ^ 0x01]).unwrap();
    drop(f);

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("r");
    let restored = s.backups.restore(id, dest.to_str().unwrap(), &NoProgress).await;
    let err = restored.expect_err("a tampered backup must not restore");
    let msg = err.to_string();
    assert!(matches!(err, BackupError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(&id.to_string()) && msg.contains("SHA-256"), "{msg}");
    assert!(!dest.exists(), "the restore touched its destination");

    let err = s
        .backups
        .verify(id, false, &NoProgress)
        .await
        .expect_err("verify must fail");
    assert!(
        matches!(err, BackupError::Corrupt { .. }) && err.to_string().contains(&id.to_string()),
        "{err}"
    );
    assert_eq!(s.backups.get(id).await.unwrap().status, "corrupt");
    // Once marked corrupt it is no longer restorable, and says why.
    let err = s
        .backups
        .restore(id, dest.to_str().unwrap(), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_backup_fails_verify_and_restore_naming_the_backup() {
    tamper(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_encrypted_backup_fails_verify_and_restore_naming_the_backup() {
    tamper(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_backup_needs_the_identity_and_refuses_a_wrong_one() {
    let mut dbs = Databases(Vec::new());
    let s = setup(&mut dbs, true, |_| {}).await;
    let id = Uuid::now_v7();
    s.backups.take(id, Source::Config, "drover").await.unwrap();
    let out = tempfile::tempdir().unwrap();
    s.backups
        .restore(id, out.path().to_str().unwrap(), &NoProgress)
        .await
        .unwrap();
    let text = std::fs::read_to_string(out.path().join(format!("drover-config-{id}.toml"))).unwrap();
    assert_eq!(text, "[effective]\nx = 1\n");

    let mut wrong = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        wrong,
        "{}",
        age::x25519::Identity::generate().to_string().expose_secret()
    )
    .unwrap();
    let s2 = Backups::new(s.catalog.clone(), s.backups.config().clone(), None, String::new())
        .unwrap()
        .with_identity_file(wrong.path().to_owned());
    let err = s2.verify(id, false, &NoProgress).await.unwrap_err();
    assert!(err.to_string().contains(&id.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_fails_the_backup_with_a_clear_error() {
    let mut dbs = Databases(Vec::new());
    let s = setup(&mut dbs, false, |c| {
        c.postgres.push(PostgresTarget {
            name: "gone".into(),
            url: "postgres://postgres@127.0.0.1:1/nothing".into(),
        })
    })
    .await;
    let id = Uuid::now_v7();
    let err = s.backups.take(id, Source::Postgres, "gone").await.unwrap_err();
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("postgres target \"gone\"") && msg.contains("127.0.0.1:1"),
        "{msg}"
    );
    let row = s.backups.get(id).await.unwrap();
    assert_eq!(row.status, "failed");
    assert_eq!(row.error.as_deref(), Some(msg.as_str()));
    // Nothing reached the store.
    assert_eq!(
        walkdir::WalkDir::new(s.store_dir.path())
            .into_iter()
            .filter(|e| e.as_ref().unwrap().file_type().is_file())
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_deletes_the_objects_then_the_rows_of_what_retention_does_not_keep() {
    let mut dbs = Databases(Vec::new());
    let policy = Retention {
        keep_last: 2,
        keep_daily: 5,
        keep_weekly: 3,
    };
    let s = setup(&mut dbs, false, |c| c.retention = policy).await;
    // 30 real backups, then dated one a day back from 2026-03-31 02:00 (a Tuesday).
    let newest = Utc.with_ymd_and_hms(2026, 3, 31, 2, 0, 0).unwrap();
    let mut ids = Vec::new();
    for day in 0..30 {
        let id = Uuid::now_v7();
        s.backups.take(id, Source::Config, "drover").await.unwrap();
        let at = newest - chrono::Duration::days(day);
        s.catalog
            .execute_unprepared(&format!(
                "UPDATE backup SET started_at = '{}' WHERE id = '{id}'",
                at.to_rfc3339()
            ))
            .await
            .unwrap();
        ids.push((id, at));
    }
    // A failed backup older than anything kept, and one inside the kept range.
    let old_failed = Uuid::now_v7();
    let recent_failed = Uuid::now_v7();
    for (id, at) in [
        (old_failed, newest - chrono::Duration::days(40)),
        (recent_failed, newest),
    ] {
        s.backups.take(id, Source::Config, "drover").await.unwrap();
        s.catalog
            .execute_unprepared(&format!(
                "UPDATE backup SET status = 'failed', started_at = '{}' WHERE id = '{id}'",
                at.to_rfc3339()
            ))
            .await
            .unwrap();
    }
    let key_of = |id: Uuid| {
        let backups = &s.backups;
        async move { backups.get(id).await.unwrap().object_key }
    };
    let mut paths = BTreeMap::new();
    for (id, _) in &ids {
        paths.insert(*id, object_path(&s, &key_of(*id).await));
    }

    let report = s.backups.prune(None).await.unwrap();

    // Kept: the 5 newest days (03-27 … 03-31), and the newest of ISO weeks 14, 13, 12:
    // 03-31, Sunday 03-29, Sunday 03-22.
    let kept_days: Vec<String> = {
        let mut d: Vec<String> = ids
            .iter()
            .filter(|(id, _)| paths[id].exists())
            .map(|(_, at)| at.format("%m-%d").to_string())
            .collect();
        d.sort();
        d
    };
    assert_eq!(kept_days, ["03-22", "03-27", "03-28", "03-29", "03-30", "03-31"]);
    assert_eq!(report.kept, 6);
    assert_eq!(report.deleted.len(), 30 - 6 + 1);
    for (id, _) in &ids {
        let row = schema::backups::get(&s.catalog, *id).await.unwrap();
        assert_eq!(
            row.is_some(),
            paths[id].exists(),
            "row and object of {id} disagree"
        );
    }
    assert!(
        schema::backups::get(&s.catalog, old_failed)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        schema::backups::get(&s.catalog, recent_failed)
            .await
            .unwrap()
            .is_some()
    );
    // A second prune finds nothing more to do.
    assert!(s.backups.prune(None).await.unwrap().deleted.is_empty());
}

#[test]
fn the_default_schedules_parse_as_apalis_cron_reads_them_and_fire_when_documented() {
    use std::str::FromStr;
    let schedules = jobs::families::backup::default_schedules([
        (Source::Postgres, "drover"),
        (Source::Files, "uploads"),
        (Source::Config, "drover"),
    ]);
    // Saturday 2026-11-28 12:00 UTC: the next daily runs are on Sunday, as are the weekly ones.
    let from = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let next: Vec<(String, String)> = schedules
        .iter()
        .map(|s| {
            let cron = cron::Schedule::from_str(&s.cron).unwrap_or_else(|e| panic!("{}: {e}", s.cron));
            let at = cron.after(&from).next().unwrap();
            (s.name.clone(), at.format("%a %Y-%m-%d %H:%M").to_string())
        })
        .collect();
    assert_eq!(
        next,
        [
            ("backup-postgres-drover".into(), "Sun 2026-11-29 02:00".into()),
            ("backup-files-uploads".into(), "Sun 2026-11-29 03:00".into()),
            ("backup-config-drover".into(), "Sun 2026-11-29 04:00".into()),
            ("backup-prune".into(), "Sun 2026-11-29 05:00".into()),
        ]
    );
    // The weekly ones skip the weekdays.
    let monday = Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap();
    let files = cron::Schedule::from_str(&schedules[1].cron).unwrap();
    assert_eq!(
        files
            .after(&monday)
            .next()
            .unwrap()
            .format("%a %d %H:%M")
            .to_string(),
        "Sun 06 03:00"
    );
}
