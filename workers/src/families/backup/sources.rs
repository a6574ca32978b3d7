//! The sources a backup reads and the destinations a restore writes: `pg_dump`/`pg_restore`,
//! tar of a file tree, drover's effective config. Everything here runs on a blocking thread
//! inside the pipeline, except the Postgres snapshot and row counts.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sea_orm::sqlx::{self, Connection, Row, postgres::PgConnection};

use super::config::FilesTarget;

/// A glob set from patterns (`*` stays within one path component, `**` crosses them).
pub(crate) fn globs(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(GlobBuilder::new(p).literal_separator(true).build()?);
    }
    set.build()
}

/// Writes a tar of the target's paths. Archive names are the paths without their leading
/// `/`, so a restore into DIR puts `/srv/uploads/a` at `DIR/srv/uploads/a`. Symlinks are
/// stored as links. A file that disappears while the tree is read is left out, not an error.
pub(crate) fn write_tar(target: &FilesTarget, out: &mut dyn Write) -> io::Result<()> {
    let include = globs(&target.include).map_err(io::Error::other)?;
    let exclude = globs(&target.exclude).map_err(io::Error::other)?;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    for root in &target.paths {
        let root_name = archive_name(root);
        std::fs::symlink_metadata(root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("files target {:?}: {}: {e}", target.name, root.display()),
            )
        })?;
        let walk = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                let rel = e.path().strip_prefix(root).unwrap_or(e.path());
                rel.as_os_str().is_empty() || !exclude.is_match(rel)
            });
        for entry in walk {
            let entry = match entry {
                Ok(e) => e,
                Err(e)
                    if e.io_error()
                        .is_some_and(|io| io.kind() == io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => return Err(io::Error::other(format!("files target {:?}: {e}", target.name))),
            };
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            let name = if rel.as_os_str().is_empty() {
                root_name.clone()
            } else {
                root_name.join(rel)
            };
            if name.as_os_str().is_empty() {
                continue;
            }
            let kind = entry.file_type();
            if !kind.is_dir() && !include.is_empty() && !include.is_match(rel) {
                continue;
            }
            let res = if kind.is_dir() {
                tar.append_dir(&name, entry.path())
            } else {
                tar.append_path_with_name(entry.path(), &name)
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(path = %entry.path().display(), "file vanished while backing up; left out");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("files target {:?}: {}: {e}", target.name, entry.path().display()),
                    ));
                }
            }
        }
    }
    tar.finish()
}

/// `/srv/a/../b` → `srv/b`-like relative name: root and `.` components dropped.
fn archive_name(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
        .collect()
}

/// Unpacks a tar into `dir`, which must be absent or empty (a restore never overwrites).
pub(crate) fn unpack_tar(input: &mut dyn Read, dir: &Path) -> io::Result<u64> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    let mut files = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        entry.unpack_in(dir)?;
        files += 1;
    }
    Ok(files)
}

/// Fails unless `dir` is absent or an empty directory; creates it.
pub(crate) fn prepare_empty_dir(dir: &Path) -> io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is not empty; restore into an empty or new directory",
                        dir.display()
                    ),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(dir),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
}

/// A connection URL split for the Postgres tools: the URL without its password (safe on a
/// command line, which other users of the machine can read) and the password for `PGPASSWORD`.
#[derive(Clone)]
pub(crate) struct PgUrl {
    pub(crate) url: String,
    pub(crate) password: Option<String>,
}

impl PgUrl {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let mut url = url::Url::parse(raw).map_err(|e| format!("not a database URL: {e}"))?;
        let password = url.password().map(percent_decode);
        if password.is_some() {
            let _ = url.set_password(None);
        }
        Ok(Self {
            url: url.to_string(),
            password,
        })
    }

    /// The URL for messages: it never holds the password.
    pub(crate) fn redacted(&self) -> String {
        self.url.clone()
    }

    /// The same server, another database.
    pub(crate) fn with_database(&self, db: &str) -> Self {
        let mut url = url::Url::parse(&self.url).expect("parsed before");
        url.set_path(&format!("/{db}"));
        Self {
            url: url.to_string(),
            password: self.password.clone(),
        }
    }

    /// The URL with the password, for drover's own connections (never shown).
    pub(crate) fn connect_url(&self) -> String {
        let mut url = url::Url::parse(&self.url).expect("parsed before");
        if let Some(p) = &self.password {
            let _ = url.set_password(Some(p));
        }
        url.to_string()
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An open transaction whose snapshot `pg_dump` shares, and the row counts it saw.
pub(crate) struct Snapshot {
    conn: PgConnection,
    pub(crate) name: String,
    pub(crate) counts: BTreeMap<String, i64>,
}

impl Snapshot {
    /// Opens a repeatable-read transaction, exports its snapshot and counts every table's rows
    /// in it, so the counts describe exactly what `pg_dump --snapshot` dumps.
    pub(crate) async fn take(url: &PgUrl) -> Result<Self, String> {
        let mut conn = PgConnection::connect(&url.connect_url())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", url.redacted()))?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut conn)
            .await
            .map_err(|e| format!("starting the snapshot transaction: {e}"))?;
        let name: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| format!("exporting a snapshot: {e}"))?;
        let counts = table_counts(&mut conn).await?;
        Ok(Self { conn, name, counts })
    }

    pub(crate) async fn close(mut self) {
        let _ = sqlx::query("COMMIT").execute(&mut self.conn).await;
        let _ = self.conn.close().await;
    }
}

/// Rows per ordinary table (`schema.table`), system schemas excluded.
pub(crate) async fn table_counts(conn: &mut PgConnection) -> Result<BTreeMap<String, i64>, String> {
    let tables = sqlx::query(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| format!("listing tables: {e}"))?;
    let mut counts = BTreeMap::new();
    for t in tables {
        let (schema, table): (String, String) = (t.get(0), t.get(1));
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(&schema),
            quote_ident(&table)
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| format!("counting rows of {schema}.{table}: {e}"))?;
        counts.insert(format!("{schema}.{table}"), n);
    }
    Ok(counts)
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Runs `pg_dump --format=custom` in `snapshot` and copies its output into `out`. pg_dump's
/// own compression is off: zstd does it better further down the pipeline.
pub(crate) fn pg_dump(url: &PgUrl, snapshot: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = url.command("pg_dump");
    cmd.args(["--format=custom", "--compress=0", "--no-password"])
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--dbname={}", url.url))
        .stdout(Stdio::piped());
    let mut child = spawn(&mut cmd, "pg_dump")?;
    let stderr = collect_stderr(child.stderr.take());
    let mut stdout = child.stdout.take().expect("piped");
    let copied = io::copy(&mut stdout, out);
    drop(stdout);
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    copied?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "pg_dump of {} failed ({status}): {}",
            url.redacted(),
            stderr.trim()
        )));
    }
    Ok(())
}

/// Feeds a custom-format dump into `pg_restore`, restoring into `url`'s (existing) database.
/// Objects keep no owner or privileges of the source server, whose roles may not exist here.
pub(crate) fn pg_restore(url: &PgUrl, input: &mut dyn Read) -> io::Result<()> {
    let mut cmd = url.command("pg_restore");
    cmd.args([
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--no-password",
    ])
    .arg(format!("--dbname={}", url.url))
    .stdin(Stdio::piped());
    let mut child = spawn(&mut cmd, "pg_restore")?;
    let stderr = collect_stderr(child.stderr.take());
    let mut stdin = child.stdin.take().expect("piped");
    let copied = io::copy(input, &mut stdin);
    drop(stdin);
    let status = child.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(io::Error::other(format!(
            "pg_restore into {} failed ({status}): {}",
            url.redacted(),
            stderr.trim()
        )));
    }
    copied.map(drop)
}

fn spawn(cmd: &mut Command, tool: &str) -> io::Result<std::process::Child> {
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                e.kind(),
                format!("{tool} is not installed (Debian: apt-get install postgresql-client, matching the server's major version)"),
            )
        } else {
            io::Error::new(e.kind(), format!("starting {tool}: {e}"))
        }
    })
}

/// Reads a child's stderr on its own thread (so a chatty child never blocks on a full pipe),
/// keeping the last 8 KiB.
fn collect_stderr(stderr: Option<std::process::ChildStderr>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 8192 {
                kept.drain(..kept.len() - 8192);
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_leaves_the_url_for_pgpassword() {
        let u = PgUrl::parse("postgres://drover:s%40cret@db:5432/app").unwrap();
        assert_eq!(u.url, "postgres://drover@db:5432/app");
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(u.connect_url(), "postgres://drover:s%40cret@db:5432/app");
        assert_eq!(
            u.with_database("scratch").url,
            "postgres://drover@db:5432/scratch"
        );
    }

    #[test]
    fn globs_keep_star_within_a_component() {
        let g = globs(&["*.log".into(), "cache/**".into()]).unwrap();
        assert!(g.is_match("a.log"));
        assert!(!g.is_match("sub/a.log"));
        assert!(g.is_match("cache/x/y"));
        assert_eq!(
            archive_name(Path::new("/srv/./uploads")),
            PathBuf::from("srv/uploads")
        );
    }
}
