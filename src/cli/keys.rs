//! `kiln keys new`: makes an API key, prints it once and the entry to add
//! to the keys file (which stores only the key's hash).

use anyhow::{Result, bail};
use kiln::security::keys;

#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// A new key for a tenant: the key on standard output's first line,
    /// then the `[[key]]` entry to append to the keys file.
    New {
        /// The tenant whose budget the key spends.
        #[arg(long)]
        tenant: String,
        /// Models the key may call (comma-separated); all when absent.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
    },
}

pub fn run(args: KeysArgs) -> Result<()> {
    match args.command {
        KeysCommand::New { tenant, models } => {
            for name in std::iter::once(&tenant).chain(&models) {
                if !keys::valid_name(name) {
                    bail!("'{name}': names are 1 to 128 of A-Z a-z 0-9 - _ . : @");
                }
            }
            let new = keys::generate(&tenant, models);
            super::emit(&format!(
                "{}\n\n# Give the key above to the caller; it is not shown again. Append to the keys file:\n{}",
                new.key.expose(),
                keys::entry_toml(&new.entry)
            ));
            Ok(())
        }
    }
}
