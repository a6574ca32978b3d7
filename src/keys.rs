//! `drover keys create|list|revoke`: API keys, straight in the database (the API needs no key
//! to be running for this, which is how the first admin key comes to exist). A created key is
//! printed once, alone on stdout (`KEY=$(drover keys create …)`); everything else goes to stderr.

use std::time::Duration;

use anyhow::Context as _;
use api::{Role, auth};
use chrono::Utc;
use clap::Subcommand;

use crate::config::Connections;

#[derive(Subcommand, Clone, Debug)]
pub enum KeysCommand {
    /// Creates a key and prints it (it is shown only this once).
    Create {
        /// viewer, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Who or what the key is for.
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. `90d`, `12h`, `30m` (default: never expires).
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<Duration>,
    },
    /// Lists every key (never the keys themselves: they are not stored).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a key by id (the 12 hex characters after `drv_`); running APIs refuse it within
    /// their key cache TTL (DROVER_KEY_CACHE_TTL_S, default 5 s).
    Revoke { id: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: use viewer, operator or admin"))
}

/// `90d`, `12h`, `30m`, `45s`, `2w`.
pub fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a lifetime like 90d, 12h, 30m or 2w");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?))
}

pub async fn run(conn: Connections, command: KeysCommand) -> anyhow::Result<()> {
    let db = schema::connect(conn.database_url.expose())
        .await
        .context("connecting to the database")?;
    schema::ensure_migrated(&db).await?;
    match command {
        KeysCommand::Create {
            role,
            name,
            expires_in,
        } => {
            let expires_at = match expires_in {
                Some(d) => Some(Utc::now() + chrono::Duration::from_std(d).context("lifetime too long")?),
                None => None,
            };
            let new = auth::create_key(&db, &name, role, expires_at).await?;
            eprintln!(
                "created {role} key {} ({name}), {}; it is shown only now:",
                new.row.id,
                expires_at.map_or_else(
                    || "never expires".to_owned(),
                    |t| format!("expires {}", t.to_rfc3339())
                )
            );
            println!("{}", new.key.expose());
        }
        KeysCommand::List { json } => {
            let now = Utc::now();
            let rows = schema::keys::list(&db).await?;
            if !json {
                println!(
                    "{:<12}  {:<8}  {:<8}  {:<20}  {:<20}  {:<20}  name",
                    "id", "role", "status", "created", "last used", "expires"
                );
            }
            for k in rows {
                let status = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else {
                    "active"
                };
                let time = |t: Option<chrono::DateTime<Utc>>| {
                    t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "id": k.id, "name": k.name, "role": k.role, "status": status,
                            "created_at": k.created_at, "last_used_at": k.last_used_at,
                            "expires_at": k.expires_at, "revoked_at": k.revoked_at,
                        })
                    );
                } else {
                    println!(
                        "{:<12}  {:<8}  {:<8}  {:<20}  {:<20}  {:<20}  {}",
                        k.id,
                        k.role,
                        status,
                        time(Some(k.created_at)),
                        time(k.last_used_at),
                        time(k.expires_at),
                        k.name
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let id = id
                .strip_prefix("drv_")
                .map_or(id.as_str(), |rest| rest.split('_').next().unwrap_or(rest));
            if schema::keys::revoke(&db, id, Utc::now()).await? {
                eprintln!("revoked key {id}");
            } else if schema::keys::get(&db, id).await?.is_some() {
                eprintln!("key {id} was already revoked");
            } else {
                anyhow::bail!("no key has id {id:?} (see `drover keys list`)");
            }
        }
    }
    Ok(())
}

/// `drover dev` on a database with no key at all: creates an admin key and returns it, so that
/// the one-command start stays usable without any default password.
pub async fn first_dev_key(db: &sea_orm::DatabaseConnection) -> anyhow::Result<Option<api::Secret>> {
    if schema::keys::count(db).await? > 0 {
        return Ok(None);
    }
    let new = auth::create_key(db, "drover dev", Role::Admin, None).await?;
    Ok(Some(new.key))
}

#[cfg(test)]
mod tests {
    use super::parse_lifetime;
    use std::time::Duration;

    #[test]
    fn lifetimes_read_with_their_unit() {
        assert_eq!(parse_lifetime("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_lifetime("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_lifetime("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in ["", "d", "30", "30y", "0d", "-1d", "1.5d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}
