//! The policy cache on disk, so that policies survive a restart: a restart must not open
//! the window that the cache exists to close (RFC 8461 §10.2), nor send every domain's
//! policy host a fetch at once.
//!
//! One JSON file per policy domain, `<domain>.json`, in a directory of mailmoat's own.
//! The file name is a [`PolicyDomain`], lower-case LDH labels and dots, so no name can
//! leave the directory. The policy is kept as its body text and parsed again on load,
//! with the same parser as a fetched one: a file edited by hand or damaged can only be
//! a valid policy or none.
//!
//! Writes are atomic: a temporary file in the same directory, written and synced, then
//! renamed over the old one, so a crash leaves the old file or the new one, never half
//! of one. Loading tolerates damage: a corrupt file is logged and skipped, like a
//! missing one, and the next fetch replaces it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::cache::Cached;
use super::name::PolicyDomain;
use super::policy::{self, MAX_POLICY_LEN, Policy};
use super::record::{self, PolicyId};

/// The file format's version, written into every file.
const FORMAT: u32 = 1;

/// Largest cache file read: a policy at its cap, JSON-escaped (CR and LF become two
/// bytes each), and room for the other fields.
const MAX_FILE_LEN: u64 = 4 * MAX_POLICY_LEN as u64;

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory could not be created or listed.
    #[error("cannot use the MTA-STS cache directory {}: {source}", dir.display())]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be written, synced, renamed into place or removed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file larger than any policy's could be.
    #[error("{} is larger than {MAX_FILE_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not the JSON of a cache entry.
    #[error("{} is not a cache entry: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A file format this version does not know.
    #[error("{} has format {found}, not {FORMAT}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it says.
        found: u32,
    },
    /// The domain inside is not the one the file is named after.
    #[error("{} holds the policy of {found:?}", path.display())]
    WrongDomain {
        /// The file.
        path: PathBuf,
        /// The domain it holds.
        found: String,
    },
    /// The id inside is not a valid policy id.
    #[error("{} holds an invalid id: {source}", path.display())]
    Id {
        /// The file.
        path: PathBuf,
        /// Why.
        source: record::Error,
    },
    /// The policy inside is not valid.
    #[error("{} holds an invalid policy: {source}", path.display())]
    Policy {
        /// The file.
        path: PathBuf,
        /// Why.
        source: policy::Error,
    },
    /// The fetch time is not a time.
    #[error("{} holds a fetch time out of range", path.display())]
    FetchTime {
        /// The file.
        path: PathBuf,
    },
}

/// One cache file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    format: u32,
    domain: String,
    id: String,
    /// Seconds since the Unix epoch.
    fetched_at: u64,
    /// The policy body, as [`Policy`]'s `Display` renders it.
    policy: String,
}

/// Distinguishes the temporary files of writes that overlap in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Uses `dir`, creating it (and its parents) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| Error::Directory {
            dir: dir.clone(),
            source,
        })?;
        Ok(Store { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, domain: &PolicyDomain) -> PathBuf {
        self.dir.join(format!("{domain}.json"))
    }

    /// The domain's cached policy; `None` if there is none, or if its file cannot be
    /// read or is corrupt (logged).
    pub fn load(&self, domain: &PolicyDomain) -> Option<Cached> {
        self.read(domain).unwrap_or_else(|err| {
            warn!(%domain, %err, "ignoring unusable mta-sts cache file");
            None
        })
    }

    /// The domain's cached policy, `Ok(None)` if no file exists, and why not otherwise.
    pub fn read(&self, domain: &PolicyDomain) -> Result<Option<Cached>, Error> {
        let path = self.path(domain);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(Error::TooLarge { path });
        }
        decode(&path, domain, &bytes).map(Some)
    }

    /// Every cached policy whose file is usable, for start-up. Corrupt files, and files
    /// not named after a policy domain, are logged and skipped.
    pub fn load_all(&self) -> Result<Vec<(PolicyDomain, Cached)>, Error> {
        let entries = fs::read_dir(&self.dir).map_err(|source| Error::Directory {
            dir: self.dir.clone(),
            source,
        })?;
        let mut loaded = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Directory {
                dir: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            // Temporary files start with a dot, and no domain does.
            match PolicyDomain::parse(stem) {
                Ok(domain) if domain.as_str() == stem => {
                    if let Some(cached) = self.load(&domain) {
                        loaded.push((domain, cached));
                    }
                }
                _ if stem.starts_with('.') => {}
                _ => {
                    warn!(file = %entry.path().display(), "ignoring a file not named after a policy domain in the mta-sts cache")
                }
            }
        }
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(loaded)
    }

    /// Writes the domain's policy, replacing any earlier one atomically.
    pub fn save(&self, domain: &PolicyDomain, cached: &Cached) -> Result<(), Error> {
        let entry = Entry {
            format: FORMAT,
            domain: domain.as_str().to_owned(),
            id: cached.id.as_str().to_owned(),
            fetched_at: cached
                .fetched_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            policy: cached.policy.to_string(),
        };
        let mut json = serde_json::to_vec_pretty(&entry).map_err(|err| Error::Write {
            path: self.path(domain),
            source: io::Error::other(err),
        })?;
        json.push(b'\n');
        let temp = self.dir.join(format!(
            ".{domain}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let path = self.path(domain);
        let written = write_synced(&temp, &json).and_then(|()| fs::rename(&temp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&temp);
            return Err(Error::Write { path, source });
        }
        // The rename is durable once the directory is synced; without that a crash may
        // lose the new entry, which only costs a fetch.
        if let Err(err) = File::open(&self.dir).and_then(|dir| dir.sync_all()) {
            warn!(dir = %self.dir.display(), %err, "cannot sync the mta-sts cache directory");
        }
        Ok(())
    }

    /// Removes the domain's cached policy (an expired one); no file is no error.
    pub fn remove(&self, domain: &PolicyDomain) -> Result<(), Error> {
        let path = self.path(domain);
        match fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                Err(Error::Write { path, source: err })
            }
            _ => Ok(()),
        }
    }
}

/// A new file (never one that exists, nor a link planted at the name), written and
/// synced.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn decode(path: &Path, domain: &PolicyDomain, bytes: &[u8]) -> Result<Cached, Error> {
    let path = || path.to_path_buf();
    let entry: Entry = serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: path(),
        source,
    })?;
    if entry.format != FORMAT {
        return Err(Error::Format {
            path: path(),
            found: entry.format,
        });
    }
    if entry.domain != domain.as_str() {
        return Err(Error::WrongDomain {
            path: path(),
            found: entry.domain,
        });
    }
    let id = PolicyId::parse(&entry.id).map_err(|source| Error::Id {
        path: path(),
        source,
    })?;
    let policy = Policy::parse(entry.policy.as_bytes()).map_err(|source| Error::Policy {
        path: path(),
        source,
    })?;
    let fetched_at = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(entry.fetched_at))
        .ok_or_else(|| Error::FetchTime { path: path() })?;
    Ok(Cached {
        id,
        fetched_at,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::super::name::MxPattern;
    use super::super::policy::Mode;
    use super::*;

    fn domain(name: &str) -> PolicyDomain {
        PolicyDomain::parse(name).unwrap()
    }

    fn cached(id: &str) -> Cached {
        Cached {
            id: PolicyId::parse(id).unwrap(),
            fetched_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            policy: Policy {
                mode: Mode::Enforce,
                max_age: Duration::from_secs(604_800),
                mx: vec![
                    MxPattern::parse("mail.example.com").unwrap(),
                    MxPattern::parse("*.example.net").unwrap(),
                ],
            },
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_saved_policy_survives_a_new_store_on_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("mta-sts")).unwrap();
        let example = domain("Example.COM");
        assert_eq!(store.load(&example), None);
        store.save(&example, &cached("one")).unwrap();

        let reopened = Store::open(dir.path().join("mta-sts")).unwrap();
        assert_eq!(reopened.load(&example), Some(cached("one")));
        assert_eq!(files(reopened.dir()), ["example.com.json"]);

        // Replacing leaves one file and no temporary one.
        reopened.save(&example, &cached("two")).unwrap();
        assert_eq!(reopened.load(&example), Some(cached("two")));
        assert_eq!(files(reopened.dir()), ["example.com.json"]);

        let text = fs::read_to_string(reopened.dir().join("example.com.json")).unwrap();
        assert!(text.contains("\"id\": \"two\""), "{text}");
        assert!(text.contains("mx: *.example.net\\r\\n"), "{text}");

        reopened.remove(&example).unwrap();
        reopened.remove(&example).unwrap();
        assert_eq!(reopened.load(&example), None);
        assert!(files(reopened.dir()).is_empty());
    }

    #[test]
    fn corrupt_files_are_skipped_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&domain("good.example"), &cached("g")).unwrap();
        let good = fs::read_to_string(dir.path().join("good.example.json")).unwrap();
        // good.example's entry, moved to `name`, with one change.
        let entry = |name: &str, from: &str, to: &str| {
            assert!(good.contains(from), "{from}");
            good.replace(
                "\"domain\": \"good.example\"",
                &format!("\"domain\": \"{name}\""),
            )
            .replace(from, to)
        };
        let write = |name: &str, bytes: &[u8]| fs::write(dir.path().join(name), bytes).unwrap();
        write("empty.example.json", b"");
        write("truncated.example.json", &good.as_bytes()[..good.len() / 2]);
        write("binary.example.json", b"\xff\xfe\0\0garbage");
        write("array.example.json", b"[1, 2, 3]");
        write("other.example.json", good.as_bytes()); // holds good.example's entry
        for (name, from, to) in [
            ("format.example", "\"format\": 1", "\"format\": 2"),
            ("id.example", "\"id\": \"g\"", "\"id\": \"../x\""),
            ("policy.example", "mode: enforce", "mode: strict"),
            ("extra.example", "\"format\": 1", "\"format\": 1, \"x\": 0"),
            (
                "time.example",
                "\"fetched_at\": 1700000000",
                "\"fetched_at\": 18446744073709551615",
            ),
            (
                "negative.example",
                "\"fetched_at\": 1700000000",
                "\"fetched_at\": -1",
            ),
        ] {
            write(&format!("{name}.json"), entry(name, from, to).as_bytes());
        }
        let mut huge = good.clone().into_bytes();
        huge.resize(MAX_FILE_LEN as usize + 1, b' ');
        write("huge.example.json", &huge);
        // Not cache entries at all: skipped without being read as one.
        write("README", b"not a cache file");
        write("UPPER.example.json", good.as_bytes());
        write("..json", good.as_bytes());
        write(".good.example.1.2.tmp", b"{");

        for (name, check) in [
            ("empty.example", "Json"),
            ("truncated.example", "Json"),
            ("binary.example", "Json"),
            ("array.example", "Json"),
            ("format.example", "Format"),
            ("other.example", "WrongDomain"),
            ("id.example", "Id"),
            ("policy.example", "Policy"),
            ("extra.example", "Json"),
            ("time.example", "FetchTime"),
            ("negative.example", "Json"),
            ("huge.example", "TooLarge"),
        ] {
            let err = store.read(&domain(name)).unwrap_err();
            assert!(format!("{err:?}").starts_with(check), "{name}: {err:?}");
            assert_eq!(store.load(&domain(name)), None, "{name}");
        }
        let all = store.load_all().unwrap();
        assert_eq!(all, [(domain("good.example"), cached("g"))]);
    }

    #[test]
    fn a_directory_where_a_file_should_be_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::create_dir(dir.path().join("dir.example.json")).unwrap();
        assert!(matches!(
            store.read(&domain("dir.example")),
            Err(Error::Read { .. })
        ));
        assert_eq!(store.load(&domain("dir.example")), None);
        assert!(matches!(
            store.save(&domain("dir.example"), &cached("x")),
            Err(Error::Write { .. })
        ));
        // The failed write left no temporary file behind.
        assert_eq!(files(dir.path()), ["dir.example.json"]);
        assert!(matches!(
            store.remove(&domain("dir.example")),
            Err(Error::Write { .. })
        ));
    }

    #[test]
    fn a_store_cannot_be_made_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(Store::open(&file), Err(Error::Directory { .. })));
    }
}
