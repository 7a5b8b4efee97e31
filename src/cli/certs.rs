//! `kiln certs dev`: throwaway certificates to try TLS and mutual TLS
//! locally (a CA, a server pair, a client pair). Not for production.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Writes ca.pem, server.pem, server.key, client.pem, client.key.
    Dev {
        /// Folder to write into (created).
        #[arg(long)]
        out: PathBuf,
        /// Host names and addresses the server certificate is for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// The client certificate's common name (its tenant under
        /// `[auth] tenant_from_client_cert`).
        #[arg(long, default_value = "dev-client")]
        client: String,
    },
}

pub fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCommand::Dev { out, hosts, client } => {
            let files = kiln::security::certs::write_dev_set(&out, &hosts, &client)?;
            super::emit(&format!(
                "wrote {} in {}\nserve:  kiln serve --tls-cert {d}/server.pem --tls-key {d}/server.key [--tls-client-ca {d}/ca.pem]\n\
                 client: kiln infer --tls-ca {d}/ca.pem [--tls-cert {d}/client.pem --tls-key {d}/client.key] ...\n",
                files.join(", "),
                out.display(),
                d = out.display()
            ));
            Ok(())
        }
    }
}
