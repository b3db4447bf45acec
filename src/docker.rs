//! The host's Docker engine, as the ECS agent supervisor and the container processor both use it:
//! connecting (with the API version agreed with the engine), telling "not found" apart from other
//! failures, and loading an image tarball. Depends on nothing else of the agent.

use std::path::{Path, PathBuf};

use bollard::errors::Error as DockerError;
use bollard::query_parameters::ImportImageOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

/// Seconds a Docker API request may take (bollard's per-client timeout).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// A failure to reach or use the engine, with the socket or file it concerns.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot use the Docker socket {socket}")]
    Socket {
        socket: String,
        #[source]
        source: DockerError,
    },
    #[error("Docker at {socket} does not answer")]
    NotAnswering {
        socket: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot open image tarball {}", path.display())]
    OpenTarball {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("docker load {} failed", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: DockerError,
    },
}

/// Connect to the Docker engine at `socket` and agree on an API version with it.
pub(crate) async fn connect(socket: &str) -> Result<Docker, Error> {
    let docker =
        Docker::connect_with_unix(socket, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|source| Error::Socket {
                socket: socket.to_string(),
                source,
            })?;
    let not_answering = |source| Error::NotAnswering {
        socket: socket.to_string(),
        source,
    };
    // Debian's docker.io speaks API 1.41; bollard defaults to a newer one.
    let docker = docker.negotiate_version().await.map_err(not_answering)?;
    docker.ping().await.map_err(not_answering)?;
    Ok(docker)
}

/// What to do about an engine's refusal that names its cause on the host, as a suffix for the reason
/// ("" when there is nothing to add). Docker on a kernel with AppArmor on (Debian's) cannot start a
/// container without `apparmor_parser`, which docker.io only recommends.
pub(crate) fn advice(reason: &str) -> &'static str {
    if reason.contains("apparmor_parser") {
        " (install AppArmor's tools, which Docker needs on this kernel: apt-get install apparmor, then systemctl restart docker)"
    } else {
        ""
    }
}

/// Whether the engine answered 404 (no such container or image).
pub(crate) fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Load an image tarball (`docker load`), streamed from disk.
pub(crate) async fn load_tarball(docker: &Docker, path: &Path) -> Result<(), Error> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| Error::OpenTarball {
            path: path.to_path_buf(),
            source,
        })?;
    let stream = tokio_util::io::ReaderStream::new(file);
    let mut progress = docker.import_image_stream(
        ImportImageOptionsBuilder::default().quiet(true).build(),
        stream,
        None,
    );
    while let Some(r) = progress.next().await {
        r.map_err(|source| Error::Load {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_apparmor_parser_gets_the_package_to_install() {
        let refused = "Docker responded with status code 500: AppArmor enabled on system but the docker-default profile could not be loaded: running `apparmor_parser apparmor_parser --version` failed with output: error: exec: \"apparmor_parser\": executable file not found in $PATH";
        assert!(super::advice(refused).contains("apt-get install apparmor"));
        assert_eq!(super::advice("no such image"), "");
    }
}
