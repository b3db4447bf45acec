//! The integration tests, one binary (one link of the harness and the SDK) with a module per area.
//! Each scenario drives the real `offload-agent` binary or the library's public interface against
//! real services: moto on 127.0.0.1, a Docker engine, a booted systemd host. `scripts/test` starts
//! them; a test that cannot find one fails and names the command that sets it up.

mod support;

/// The command line as an operator meets it.
mod cli;
/// `diagnose`: the support bundle, every section, no secret.
mod diagnose;
/// The ECS agent supervisor against a real Docker engine.
mod ecs_agent;
/// Behind a company's egress: an authenticating proxy, a private root CA, no credentials.
mod egress;
/// Kills, outages, a misbehaving network and a fleet on one queue.
mod faults;
/// Rotated credentials, `register`/`deregister`, Parameter Store.
mod hybrid;
/// Bounded memory on a file far larger than any buffer.
mod memory;
/// The admin endpoint and `status`.
mod monitoring;
/// Bring-your-own processors: a container image and a command.
mod processors;
/// Property tests of the two parsers that take input from outside.
mod properties;
/// `provision` and `provision --destroy` against the emulator.
mod provision;
/// The booted host: the .deb under systemd and journald.
mod systemd;
/// Declared table schemas and compressed objects end to end.
mod tables;
/// The laptop VM: its own kernel, Docker and systemd under QEMU, provisioned as Vagrant would.
mod vm;
/// End-to-end scenarios of the file-event worker.
mod worker;
