//! Compiles `proto/*.proto` with protox (pure Rust, no `protoc`) and generates prost types plus
//! serde attributes (bytes as hex, optional fields omitted when unset) and pRPC service glue.

use std::fmt::Write as _;
use std::path::PathBuf;

use prost_build::{Service, ServiceGenerator};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

const PROTOS: &[&str] = &[
    "agent_rpc.proto",
    "kms_rpc.proto",
    "gateway_rpc.proto",
    "vmm_rpc.proto",
    "host_api.proto",
    "guest_api.proto",
    "sim_tdx.proto",
];

/// Fields whose JSON form deviates from the generic rules (dstack does the same).
const EXTRA_FIELD_ATTRS: &[(&str, &str)] = &[(
    ".dstack_guest.GetQuoteResponse.attestation",
    "#[serde(skip_serializing_if = \"::prost::alloc::vec::Vec::is_empty\")]",
)];

fn main() {
    if let Err(e) = run() {
        // Build scripts report failure by exiting non-zero; the message ends up in cargo's output.
        println!("cargo::error=dstack-rpc build.rs: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let proto_dir = manifest.join("proto");
    println!("cargo::rerun-if-changed=build.rs");
    for p in PROTOS {
        println!("cargo::rerun-if-changed=proto/{p}");
    }

    let fds = protox::compile(PROTOS, [&proto_dir]).map_err(|e| format!("protox: {e:?}"))?;

    let mut config = prost_build::Config::new();
    // "." matches every message exactly once (nested ones included) and no enums/oneofs.
    config.message_attribute(".", "#[derive(::serde::Serialize, ::serde::Deserialize)]");
    config.message_attribute(".", "#[serde(default)]");
    for (path, attr) in field_attributes(&fds)? {
        config.field_attribute(path, attr);
    }
    for (path, attr) in EXTRA_FIELD_ATTRS {
        config.field_attribute(path, attr);
    }
    config.service_generator(Box::new(PrpcGenerator));
    config.compile_fds(fds).map_err(|e| format!("prost-build: {e}"))?;
    Ok(())
}

/// Walks every message and returns the serde attributes its fields need.
fn field_attributes(fds: &FileDescriptorSet) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for file in &fds.file {
        if file.package() == "google.protobuf" {
            continue;
        }
        let prefix = format!(".{}", file.package());
        for msg in &file.message_type {
            walk_message(&prefix, msg, &mut out)?;
        }
    }
    Ok(out)
}

fn walk_message(parent: &str, msg: &DescriptorProto, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let path = format!("{parent}.{}", msg.name());
    if msg.options.as_ref().is_some_and(|o| o.map_entry()) {
        // Map entries become HashMap fields; bytes values would need a map-aware hex adapter.
        if msg.field.iter().any(|f| f.r#type() == Type::Bytes) {
            return Err(format!("{path}: maps with bytes are not supported"));
        }
        return Ok(());
    }
    for f in &msg.field {
        let field_path = format!("{path}.{}", f.name());
        let optional = f.proto3_optional();
        if f.oneof_index.is_some() && !optional {
            return Err(format!("{field_path}: oneof is not supported by the serde mapping"));
        }
        if f.r#type() == Type::Bytes {
            let module = if f.label() == Label::Repeated {
                "repeated"
            } else if optional {
                "option"
            } else {
                "bytes"
            };
            out.push((
                field_path.clone(),
                format!("#[serde(with = \"crate::serde_hex::{module}\")]"),
            ));
        }
        if f.r#type() == Type::Message && f.type_name() == ".google.protobuf.Empty" {
            return Err(format!("{field_path}: Empty as a field type is not supported"));
        }
        if optional {
            out.push((
                field_path,
                "#[serde(skip_serializing_if = \"::core::option::Option::is_none\")]".to_owned(),
            ));
        }
    }
    for nested in &msg.nested_type {
        walk_message(&path, nested, out)?;
    }
    Ok(())
}

/// Emits, per service: `<Name>Rpc` trait, `<Name>Server<T>` (a `crate::Dispatch`) and
/// `<Name>Client<C>`.
struct PrpcGenerator;

/// Rust type used for an rpc argument/result; prost maps google.protobuf.Empty to `()`, whose
/// serde form is `null`, so we substitute our own `Empty` that serializes as `{}`.
fn rust_type(t: &str) -> &str {
    if t == "()" { "crate::Empty" } else { t }
}

impl ServiceGenerator for PrpcGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        // `write!` into a String cannot fail.
        let _ = generate_service(&service, buf);
    }
}

fn generate_service(s: &Service, buf: &mut String) -> std::fmt::Result {
    let name = &s.name;
    let proto = &s.proto_name;
    let pkg = &s.package;
    let rpc = format!("{name}Rpc");
    let server = format!("{name}Server");
    let client = format!("{name}Client");

    // ---- trait ----
    writeln!(
        buf,
        "/// Handler trait for the `{pkg}.{proto}` service; implement with `async fn`."
    )?;
    writeln!(
        buf,
        "pub trait {rpc}: ::core::marker::Send + ::core::marker::Sync + 'static {{"
    )?;
    for m in &s.methods {
        writeln!(buf, "    /// `{proto}.{}`", m.proto_name)?;
        writeln!(
            buf,
            "    fn {}(&self, ctx: &crate::CallContext, req: {}) -> impl ::core::future::Future<Output = ::core::result::Result<{}, crate::RpcError>> + ::core::marker::Send;",
            m.name,
            rust_type(&m.input_type),
            rust_type(&m.output_type)
        )?;
    }
    writeln!(buf, "}}\n")?;

    // ---- server ----
    writeln!(buf, "/// Routes `{proto}` pRPC calls to a [`{rpc}`] implementation.")?;
    writeln!(buf, "pub struct {server}<T> {{ inner: ::std::sync::Arc<T> }}\n")?;
    writeln!(buf, "impl<T> ::core::clone::Clone for {server}<T> {{")?;
    writeln!(
        buf,
        "    fn clone(&self) -> Self {{ Self {{ inner: ::std::sync::Arc::clone(&self.inner) }} }}"
    )?;
    writeln!(buf, "}}\n")?;
    writeln!(buf, "impl<T: {rpc}> {server}<T> {{")?;
    writeln!(buf, "    /// Service name accepted as a `{proto}.` method prefix.")?;
    writeln!(buf, "    pub const SERVICE_NAME: &'static str = \"{proto}\";")?;
    let names: Vec<String> = s.methods.iter().map(|m| format!("\"{}\"", m.proto_name)).collect();
    writeln!(buf, "    /// Method names of this service.")?;
    writeln!(
        buf,
        "    pub const METHODS: &'static [&'static str] = &[{}];",
        names.join(", ")
    )?;
    writeln!(buf, "    /// Wraps a handler.")?;
    writeln!(
        buf,
        "    pub fn new(inner: T) -> Self {{ Self {{ inner: ::std::sync::Arc::new(inner) }} }}"
    )?;
    writeln!(buf, "    /// Wraps a shared handler.")?;
    writeln!(
        buf,
        "    pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{ Self {{ inner }} }}"
    )?;
    writeln!(buf, "    /// The wrapped handler.")?;
    writeln!(buf, "    pub fn inner(&self) -> &::std::sync::Arc<T> {{ &self.inner }}")?;
    writeln!(buf, "}}\n")?;
    writeln!(buf, "impl<T: {rpc}> crate::Dispatch for {server}<T> {{")?;
    writeln!(
        buf,
        "    fn service_name(&self) -> &'static str {{ Self::SERVICE_NAME }}"
    )?;
    writeln!(
        buf,
        "    fn methods(&self) -> &'static [&'static str] {{ Self::METHODS }}"
    )?;
    writeln!(
        buf,
        "    fn dispatch<'a>(&'a self, ctx: &'a crate::CallContext, method: &'a str, encoding: crate::Encoding, body: ::bytes::Bytes) -> crate::BoxFuture<'a, ::core::result::Result<crate::EncodedResponse, crate::RpcError>> {{"
    )?;
    writeln!(buf, "        ::std::boxed::Box::pin(async move {{")?;
    writeln!(buf, "            match method {{")?;
    for m in &s.methods {
        writeln!(buf, "                \"{}\" => {{", m.proto_name)?;
        writeln!(
            buf,
            "                    let req: {} = crate::codec::decode_request(\"{}\", encoding, &body)?;",
            rust_type(&m.input_type),
            m.proto_name
        )?;
        writeln!(
            buf,
            "                    let resp = self.inner.{}(ctx, req).await?;",
            m.name
        )?;
        writeln!(
            buf,
            "                    crate::codec::encode_response(\"{}\", &resp, encoding)",
            m.proto_name
        )?;
        writeln!(buf, "                }}")?;
    }
    writeln!(
        buf,
        "                _ => ::core::result::Result::Err(crate::RpcError::MethodNotFound(::std::string::ToString::to_string(method))),"
    )?;
    writeln!(buf, "            }}")?;
    writeln!(buf, "        }})")?;
    writeln!(buf, "    }}")?;
    writeln!(buf, "}}\n")?;

    // ---- client ----
    writeln!(
        buf,
        "/// Typed client for the `{proto}` service over any [`crate::Transport`]."
    )?;
    writeln!(buf, "#[derive(Debug, Clone)]")?;
    writeln!(buf, "pub struct {client}<C = crate::Client> {{ inner: C }}\n")?;
    writeln!(buf, "impl<C: crate::Transport> {client}<C> {{")?;
    writeln!(buf, "    /// Wraps a transport (e.g. a [`crate::Client`]).")?;
    writeln!(buf, "    pub fn new(inner: C) -> Self {{ Self {{ inner }} }}")?;
    writeln!(buf, "    /// The underlying transport.")?;
    writeln!(buf, "    pub fn transport(&self) -> &C {{ &self.inner }}")?;
    for m in &s.methods {
        let input = rust_type(&m.input_type);
        let output = rust_type(&m.output_type);
        writeln!(buf, "    /// Calls `{proto}.{}`.", m.proto_name)?;
        if input == "crate::Empty" {
            writeln!(
                buf,
                "    pub async fn {}(&self) -> ::core::result::Result<{output}, crate::RpcError> {{ self.inner.call(\"{}\", &crate::Empty {{}}).await }}",
                m.name, m.proto_name
            )?;
        } else {
            writeln!(
                buf,
                "    pub async fn {}(&self, req: {input}) -> ::core::result::Result<{output}, crate::RpcError> {{ self.inner.call(\"{}\", &req).await }}",
                m.name, m.proto_name
            )?;
        }
    }
    writeln!(buf, "}}\n")?;
    Ok(())
}
