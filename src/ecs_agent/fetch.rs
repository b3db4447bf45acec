//! The agent image's tarball: its SHA-256 checked before Docker loads it, and, when the configuration
//! names where it comes from (`ecs_agent.image_url = "s3://bucket/key"`), fetched from S3 into
//! `ecs_agent.image_tarball` first. The download goes to a `.part` file beside the tarball, hashed as it
//! comes, and is renamed into place only when its digest is the configured one: a tarball on the host
//! is always one that was verified, and a wrong or truncated object never replaces a good one.

use std::path::{Path, PathBuf};

use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::SetupError;

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// The tarball on the host already has the digest: nothing downloaded.
    Present,
    /// Downloaded, verified and renamed into place: this many bytes.
    Downloaded(u64),
}

fn hex_of(h: sha2::Sha256) -> String {
    hex::encode(h.finalize())
}

/// The SHA-256 of a file, read off the runtime's threads.
async fn sha256_of(path: &Path) -> Result<String, SetupError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex_of(h))
    })
    .await
    .map_err(|e| SetupError::File {
        action: "hash",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| SetupError::File {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// The tarball's SHA-256 against `want` (lower-case hex).
pub(crate) async fn check_digest(tarball: &Path, want: &str) -> Result<(), SetupError> {
    let got = sha256_of(tarball).await?;
    if got == want {
        Ok(())
    } else {
        Err(SetupError::Digest {
            of: tarball.display().to_string(),
            want: want.to_string(),
            got,
        })
    }
}

/// The `.part` file a download is written to before it is verified.
fn part_path(tarball: &Path) -> PathBuf {
    let mut name = tarball.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    tarball.with_file_name(name)
}

/// Make `tarball` the object at `url` (`s3://bucket/key`) with SHA-256 `want`: kept when the file
/// there already has that digest, else downloaded, verified and renamed into place. A wrong digest
/// leaves the host as it was (the `.part` file removed).
pub(crate) async fn fetch(
    s3: &aws_sdk_s3::Client,
    url: &str,
    tarball: &Path,
    want: &str,
) -> Result<Fetched, SetupError> {
    if tokio::fs::try_exists(tarball).await.unwrap_or(false) && sha256_of(tarball).await? == want {
        return Ok(Fetched::Present);
    }
    let (bucket, key) = crate::event::parse_s3_url(url).ok_or_else(|| SetupError::Fetch {
        url: url.to_string(),
        reason: "not an s3://bucket/key URL".into(),
    })?;
    let fetch_error = |reason: String| SetupError::Fetch {
        url: url.to_string(),
        reason,
    };
    let out = s3
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .map_err(|e| fetch_error(crate::error::describe(&e)))?;
    let file_error = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| SetupError::File {
            action,
            path,
            source,
        }
    };
    if let Some(dir) = tarball.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(file_error("create", dir))?;
    }
    let part = part_path(tarball);
    let written = download_into(out.body, &part, url).await;
    let (got, bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    if got != want {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(SetupError::Digest {
            of: url.to_string(),
            want: want.to_string(),
            got,
        });
    }
    tokio::fs::rename(&part, tarball)
        .await
        .map_err(file_error("rename into place", tarball))?;
    Ok(Fetched::Downloaded(bytes))
}

/// Stream `body` into `part` (flushed to the disk), hashing it; its SHA-256 and length.
async fn download_into(
    mut body: aws_sdk_s3::primitives::ByteStream,
    part: &Path,
    url: &str,
) -> Result<(String, u64), SetupError> {
    let file_error = |action: &'static str| {
        let path = part.to_path_buf();
        move |source| SetupError::File {
            action,
            path,
            source,
        }
    };
    let mut f = tokio::fs::File::create(part)
        .await
        .map_err(file_error("create"))?;
    let mut h = sha2::Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = body.try_next().await.map_err(|e| SetupError::Fetch {
        url: url.to_string(),
        reason: format!("the download broke off after {bytes} bytes: {e}"),
    })? {
        h.update(&chunk);
        bytes += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(file_error("write"))?;
    }
    f.sync_all().await.map_err(file_error("flush"))?;
    Ok((hex_of(h), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_part_file_is_beside_the_tarball() {
        assert_eq!(
            part_path(Path::new("/var/cache/ecs/ecs-agent.tar")),
            PathBuf::from("/var/cache/ecs/ecs-agent.tar.part")
        );
    }

    #[tokio::test]
    async fn a_digest_is_checked_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tar");
        std::fs::write(&p, b"abc").unwrap();
        // sha256("abc")
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        check_digest(&p, abc).await.unwrap();
        let e = check_digest(&p, &"0".repeat(64)).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{} has SHA-256 {abc}, not 000", p.display())),
            "{e}"
        );
    }
}
