//! The inside of a sandbox: read a token and an API key through the socket named by
//! `LLXPRT_CREDENTIAL_SOCKET`, as a sandboxed tool would.
//!
//! Run against a proxy started with `credproxy serve --allow anthropic`:
//! `LLXPRT_CREDENTIAL_SOCKET=/path/from/serve cargo run --example sandbox_client -- anthropic`

use std::process::ExitCode;

use credproxy::client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let provider = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "anthropic".to_owned());
    let client = match Client::from_env() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("sandbox_client: {e}");
            return ExitCode::from(4);
        }
    };
    match client.get_token(&provider, None).await {
        Ok(Some(token)) => {
            // Print the sanitized token; it never carries a refresh token.
            println!("{}", serde_json::to_string(&token).unwrap_or_default());
        }
        Ok(None) => {
            eprintln!("sandbox_client: no token stored for {provider}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("sandbox_client: {e}");
            return ExitCode::from(3);
        }
    }
    match client.has_api_key(&provider).await {
        Ok(true) => println!("API key {provider}: present"),
        Ok(false) => println!("API key {provider}: absent"),
        Err(e) => eprintln!("sandbox_client: API key {provider}: {e}"),
    }
    ExitCode::SUCCESS
}
