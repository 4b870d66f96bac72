//! A minimal Ethereum client: JSON-RPC over our own HTTP client (`http://` only — the chain node is expected on
//! loopback or a private network) and legacy EIP-155 transactions signed with k256. Only what the on-chain
//! policy (`eth_call`) and the admin CLI (deploy, transact) need; ABI encoding is alloy's (`sol!`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256, keccak256};
use alloy_rlp::{Encodable, Header};
use k256::ecdsa::SigningKey;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Why a chain request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("RPC URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("JSON-RPC transport: {0}")]
    Transport(String),
    #[error("JSON-RPC endpoint answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("JSON-RPC error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("malformed JSON-RPC answer to {method}: {reason}")]
    Answer { method: String, reason: String },
    #[error("private key: {0}")]
    Key(String),
    #[error("transaction {0} reverted")]
    Reverted(B256),
    #[error("no receipt for transaction {0} within {1:?}")]
    NoReceipt(B256, Duration),
    #[error("ABI: {0}")]
    Abi(String),
    #[error("{0}")]
    Invalid(String),
}

/// A JSON-RPC endpoint.
#[derive(Debug)]
pub struct EthRpc {
    client: dstack_rpc::Client,
    path: String,
    url: String,
    next_id: AtomicU64,
}

#[derive(Deserialize)]
struct RpcAnswer {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<RpcErrorObject>,
}

#[derive(Deserialize)]
struct RpcErrorObject {
    code: i64,
    message: String,
    #[serde(default)]
    data: Option<Value>,
}

/// The parts of a transaction receipt we use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub transaction_hash: B256,
    pub status: Option<String>,
    pub contract_address: Option<Address>,
}

fn quantity(method: &str, v: &str) -> Result<u128, ChainError> {
    let digits = v.strip_prefix("0x").unwrap_or(v);
    u128::from_str_radix(digits, 16).map_err(|e| ChainError::Answer {
        method: method.into(),
        reason: format!("quantity {v:?}: {e}"),
    })
}

impl EthRpc {
    /// `url` is `http://host:port[/path]`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, ChainError> {
        let bad = |reason: String| ChainError::Url {
            url: url.to_owned(),
            reason,
        };
        if !url.starts_with("http://") {
            return Err(bad("only http:// JSON-RPC endpoints are supported".into()));
        }
        let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        let client = dstack_rpc::Client::new(url)
            .map_err(|e| bad(e.to_string()))?
            .with_timeout(timeout)
            .with_connect_timeout(timeout);
        let path = match uri.path() {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        Ok(Self {
            client,
            path,
            url: url.to_owned(),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One JSON-RPC call.
    pub async fn request<T: DeserializeOwned>(&self, method: &str, params: Value) -> Result<T, ChainError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        let resp = self
            .client
            .send(http::Method::POST, &self.path, Some("application/json"), body.into())
            .await
            .map_err(|e| ChainError::Transport(e.to_string()))?;
        if !resp.status.is_success() {
            let body = String::from_utf8_lossy(&resp.body[..resp.body.len().min(256)]).into_owned();
            return Err(ChainError::Status {
                status: resp.status.as_u16(),
                body,
            });
        }
        let answer = |reason: String| ChainError::Answer {
            method: method.into(),
            reason,
        };
        let parsed: RpcAnswer = serde_json::from_slice(&resp.body).map_err(|e| answer(e.to_string()))?;
        if let Some(e) = parsed.error {
            let message = match e.data {
                Some(d) => format!("{} (data: {d})", e.message),
                None => e.message,
            };
            return Err(ChainError::Rpc { code: e.code, message });
        }
        serde_json::from_value(parsed.result.unwrap_or(Value::Null)).map_err(|e| answer(e.to_string()))
    }

    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        let v: String = self.request("eth_chainId", json!([])).await?;
        Ok(quantity("eth_chainId", &v)? as u64)
    }

    /// `eth_call` against the latest block.
    pub async fn call(&self, to: Address, data: &[u8]) -> Result<Bytes, ChainError> {
        let tx = json!({"to": to, "data": Bytes::copy_from_slice(data)});
        self.request("eth_call", json!([tx, "latest"])).await
    }

    pub async fn code(&self, addr: Address) -> Result<Bytes, ChainError> {
        self.request("eth_getCode", json!([addr, "latest"])).await
    }

    async fn nonce(&self, addr: Address) -> Result<u64, ChainError> {
        let v: String = self
            .request("eth_getTransactionCount", json!([addr, "pending"]))
            .await?;
        Ok(quantity("eth_getTransactionCount", &v)? as u64)
    }

    async fn gas_price(&self) -> Result<u128, ChainError> {
        let v: String = self.request("eth_gasPrice", json!([])).await?;
        quantity("eth_gasPrice", &v)
    }

    async fn estimate_gas(&self, from: Address, to: Option<Address>, data: &[u8]) -> Result<u64, ChainError> {
        let mut tx = json!({"from": from, "data": Bytes::copy_from_slice(data)});
        if let Some(to) = to {
            tx["to"] = json!(to);
        }
        let v: String = self.request("eth_estimateGas", json!([tx])).await?;
        Ok(quantity("eth_estimateGas", &v)? as u64)
    }

    /// Signs and sends a transaction (`to = None`: contract creation), waits for its receipt and fails if it
    /// reverted. Gas is estimated first, so a call the contract would refuse fails before anything is sent.
    pub async fn transact(&self, wallet: &Wallet, to: Option<Address>, data: &[u8]) -> Result<Receipt, ChainError> {
        let chain_id = self.chain_id().await?;
        let gas = self.estimate_gas(wallet.address(), to, data).await?;
        let tx = LegacyTx {
            nonce: self.nonce(wallet.address()).await?,
            gas_price: self.gas_price().await?,
            // Headroom over the estimate (estimates can be tight for calls into other contracts).
            gas_limit: gas.saturating_add(gas / 4),
            to,
            value: U256::ZERO,
            data: Bytes::copy_from_slice(data),
        };
        let raw = wallet.sign_legacy(&tx, chain_id)?;
        let hash: B256 = self
            .request("eth_sendRawTransaction", json!([Bytes::from(raw)]))
            .await?;
        let wait = Duration::from_secs(30);
        let start = std::time::Instant::now();
        loop {
            let r: Option<Receipt> = self.request("eth_getTransactionReceipt", json!([hash])).await?;
            if let Some(r) = r {
                if r.status.as_deref().map(|s| quantity("receipt.status", s)).transpose()? != Some(1) {
                    return Err(ChainError::Reverted(hash));
                }
                return Ok(r);
            }
            if start.elapsed() > wait {
                return Err(ChainError::NoReceipt(hash, wait));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A pre-EIP-1559 transaction (accepted by every chain; signed with EIP-155 replay protection).
#[derive(Debug, Clone)]
pub struct LegacyTx {
    pub nonce: u64,
    pub gas_price: u128,
    pub gas_limit: u64,
    pub to: Option<Address>,
    pub value: U256,
    pub data: Bytes,
}

impl LegacyTx {
    /// RLP list of the six fields followed by `tail` (the EIP-155 signing triple or the signature).
    fn rlp(&self, tail: &[&dyn Encodable]) -> Vec<u8> {
        let mut payload = Vec::new();
        self.nonce.encode(&mut payload);
        self.gas_price.encode(&mut payload);
        self.gas_limit.encode(&mut payload);
        match &self.to {
            Some(a) => a.encode(&mut payload),
            None => (&[][..] as &[u8]).encode(&mut payload),
        }
        self.value.encode(&mut payload);
        self.data.encode(&mut payload);
        for item in tail {
            item.encode(&mut payload);
        }
        let mut out = Vec::with_capacity(payload.len() + 9);
        Header {
            list: true,
            payload_length: payload.len(),
        }
        .encode(&mut out);
        out.extend_from_slice(&payload);
        out
    }

    /// EIP-155 signing hash: keccak256(rlp([nonce, gasPrice, gas, to, value, data, chainId, 0, 0])).
    pub fn signing_hash(&self, chain_id: u64) -> B256 {
        keccak256(self.rlp(&[&chain_id, &0u8, &0u8]))
    }
}

/// A secp256k1 account key.
pub struct Wallet {
    key: SigningKey,
    address: Address,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Wallet {
    /// From a 32-byte secret in hex (`0x` optional, surrounding whitespace ignored).
    pub fn from_hex(secret: &str) -> Result<Self, ChainError> {
        let s = secret.trim();
        let bytes = zeroize::Zeroizing::new(
            hex::decode(s.strip_prefix("0x").unwrap_or(s)).map_err(|e| ChainError::Key(format!("not hex: {e}")))?,
        );
        let key = SigningKey::from_slice(&bytes).map_err(|_| ChainError::Key("not a secp256k1 secret".into()))?;
        let point = key.verifying_key().to_sec1_point(false);
        let uncompressed = point.as_bytes();
        // Ethereum address: the last 20 bytes of keccak256(x || y).
        let hash = keccak256(uncompressed.get(1..).unwrap_or_default());
        Ok(Self {
            key,
            address: Address::from_slice(&hash[12..]),
        })
    }

    pub fn address(&self) -> Address {
        self.address
    }

    /// The signed raw transaction (RLP with v = recid + 35 + 2·chain_id, r, s).
    pub fn sign_legacy(&self, tx: &LegacyTx, chain_id: u64) -> Result<Vec<u8>, ChainError> {
        let hash = tx.signing_hash(chain_id);
        let (sig, recid) = self.key.sign_prehash_recoverable(hash.as_slice());
        let bytes = sig.to_bytes();
        let r = U256::from_be_slice(&bytes[..32]);
        let s = U256::from_be_slice(&bytes[32..]);
        let v = u64::from(recid.to_byte())
            .checked_add(
                chain_id
                    .checked_mul(2)
                    .and_then(|c| c.checked_add(35))
                    .ok_or_else(|| ChainError::Invalid(format!("chain id {chain_id} too large for EIP-155")))?,
            )
            .ok_or_else(|| ChainError::Invalid(format!("chain id {chain_id} too large for EIP-155")))?;
        Ok(tx.rlp(&[&v, &r, &s]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of EIP-155 (its text gives the signing data, hash and signed transaction).
    #[test]
    fn eip155_example() {
        let tx = LegacyTx {
            nonce: 9,
            gas_price: 20_000_000_000,
            gas_limit: 21000,
            to: Some("0x3535353535353535353535353535353535353535".parse().unwrap()),
            value: U256::from(1_000_000_000_000_000_000u128),
            data: Bytes::new(),
        };
        assert_eq!(
            hex::encode(tx.rlp(&[&1u64, &0u8, &0u8])),
            "ec098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a764000080018080"
        );
        assert_eq!(
            hex::encode(tx.signing_hash(1)),
            "daf5a779ae972f972197303d7b574746c7ef83eadac0f2791ad23db92e4c8e53"
        );
        let w = Wallet::from_hex("0x4646464646464646464646464646464646464646464646464646464646464646").unwrap();
        assert_eq!(
            hex::encode(w.sign_legacy(&tx, 1).unwrap()),
            "f86c098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a76400008025a0\
             28ef61340bd939bc2195fe537567866003e1a15d3c71ff63e1590620aa636276a067cbe9d8997f761aecb703304b3800ccf555c9f3dc64214b297fb1966a3b6d83"
        );
        assert_eq!(
            w.address(),
            "0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F".parse::<Address>().unwrap()
        );
    }

    #[test]
    fn anvil_dev_key_address() {
        // Anvil's (and Hardhat's) well-known first development account.
        let w = Wallet::from_hex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80\n").unwrap();
        assert_eq!(
            w.address(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266".parse::<Address>().unwrap()
        );
        assert!(Wallet::from_hex("zz").is_err());
        assert!(Wallet::from_hex(&"00".repeat(32)).is_err());
    }

    #[test]
    fn endpoint_urls() {
        assert!(EthRpc::new("https://x", Duration::from_secs(1)).is_err());
        assert_eq!(
            EthRpc::new("http://127.0.0.1:8545", Duration::from_secs(1))
                .unwrap()
                .path,
            "/"
        );
    }
}
