//! Peak memory of a backup of a large file tree: generates a tree of `BACKUP_RSS_MIB` MiB
//! (default 1024) in a temp dir, half incompressible and half text, backs it up through the
//! real pipeline (tar → zstd → age → SHA-256 → file:// store) and verifies it, printing the
//! process's peak resident set (VmHWM) after each phase.
//!
//! ```sh
//! cargo run -p workers --example backup_rss            # 1 GiB, encrypted
//! BACKUP_RSS_MIB=256 BACKUP_RSS_PLAIN=1 cargo run -p workers --example backup_rss
//! ```
//! Linux only (reads /proc/self/status). Needs no service: the catalog is a SQLite file.

use std::{io::Write, path::Path, time::Instant};

use age::secrecy::ExposeSecret;
use jobs::families::backup::Source;
use workers::families::backup::{BackupConfig, Backups, FilesTarget, NoProgress};

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Writes `mib` MiB as 4 MiB files under nested directories, plus a thousand small files,
/// one 1 MiB buffer at a time.
fn generate(root: &Path, mib: u64) -> std::io::Result<u64> {
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let files = mib.div_ceil(4);
    for f in 0..files {
        let dir = root.join(format!("d{:02}/e{:02}", f % 16, (f / 16) % 8));
        std::fs::create_dir_all(&dir)?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("f{f:05}.dat")))?);
        for chunk in 0..4 {
            if (f + chunk) % 2 == 0 {
                for w in buf.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            } else {
                let line = format!("{f},{chunk},some,text,that,compresses,{x}\n");
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = line.as_bytes()[i % line.len()];
                }
            }
            file.write_all(&buf)?;
            written += buf.len() as u64;
        }
        file.flush()?;
    }
    std::fs::create_dir_all(root.join("small"))?;
    for i in 0..1000 {
        std::fs::write(
            root.join(format!("small/s{i:04}.txt")),
            format!("small file {i}\n"),
        )?;
    }
    Ok(written)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::var("BACKUP_RSS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let encrypt = std::env::var_os("BACKUP_RSS_PLAIN").is_none();
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    let started = Instant::now();
    let bytes = generate(&tree, mib)?;
    println!(
        "generated {:.0} MiB in {:.1} s; VmHWM {} KiB",
        bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64(),
        vm_hwm_kib()
    );

    let db = schema::connect(&format!("sqlite://{}", work.path().join("catalog.db").display())).await?;
    schema::migrate(&db).await?;
    let mut config = BackupConfig {
        store: work.path().join("store").display().to_string(),
        drover_database: false,
        files: vec![FilesTarget {
            name: "tree".into(),
            paths: vec![tree.clone()],
            include: vec![],
            exclude: vec![],
        }],
        ..Default::default()
    };
    let identity_file = work.path().join("identity.txt");
    if encrypt {
        let id = age::x25519::Identity::generate();
        std::fs::write(&identity_file, format!("{}\n", id.to_string().expose_secret()))?;
        config.age_recipients = vec![id.to_public().to_string()];
        config.age_identity_file = Some(identity_file);
    }
    let backups = Backups::new(db, config, None, String::new())?;
    let before = vm_hwm_kib();

    let started = Instant::now();
    let row = backups.take(uuid::Uuid::now_v7(), Source::Files, "tree").await?;
    let took = started.elapsed();
    let after_backup = vm_hwm_kib();
    println!(
        "backup: {} MiB read, {} MiB stored (encrypted: {encrypt}) in {:.1} s ({:.0} MiB/s); VmHWM {} KiB (before the backup {} KiB)",
        row.source_bytes.unwrap_or(0) >> 20,
        row.stored_bytes.unwrap_or(0) >> 20,
        took.as_secs_f64(),
        row.source_bytes.unwrap_or(0) as f64 / 1048576.0 / took.as_secs_f64().max(1e-9),
        after_backup,
        before
    );

    let started = Instant::now();
    backups.verify(row.id, false, &NoProgress).await?;
    println!(
        "verify (digest pass + decrypt/decompress pass): {:.1} s; VmHWM {} KiB",
        started.elapsed().as_secs_f64(),
        vm_hwm_kib()
    );
    println!(
        "RESULT peak_rss_mib={:.1} tree_mib={} encrypted={encrypt} backup_s={:.1}",
        vm_hwm_kib() as f64 / 1024.0,
        bytes >> 20,
        took.as_secs_f64()
    );
    Ok(())
}
