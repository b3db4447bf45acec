//! Generate the man page and shell completions from the CLI definition, for the packages:
//! `cargo run --example gen-docs -- packaging/generated` (scripts/package does this).

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use offload_agent::cli::Cli;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "packaging/generated".into()),
    );
    std::fs::create_dir_all(&out)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    // The subcommands' own pages: offload-agent-run(1), ...
    for sub in cmd.get_subcommands() {
        let name = format!("offload-agent-{}", sub.get_name());
        let mut text = Vec::new();
        // A one-shot generator: leaking the name gives clap the 'static str it wants.
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(sub.clone().name(static_name)).render(&mut text)?;
        std::fs::write(out.join(format!("{name}.1")), text)?;
    }
    std::fs::write(out.join("offload-agent.1"), page)?;
    for (shell, file) in [
        (Shell::Bash, "offload-agent.bash"),
        (Shell::Zsh, "_offload-agent"),
        (Shell::Fish, "offload-agent.fish"),
    ] {
        let mut f = std::fs::File::create(out.join(file))?;
        clap_complete::generate(shell, &mut cmd.clone(), "offload-agent", &mut f);
    }
    println!("wrote the man pages and completions to {}", out.display());
    Ok(())
}
