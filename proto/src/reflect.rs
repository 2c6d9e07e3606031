//! Reflection over every message this crate defines: render an encoded resource
//! (`google.protobuf.Any`) as canonical proto3 JSON (durations as `"0.5s"`, enums by name,
//! camelCase field names, default values omitted), and back. Used by config dumps, golden
//! tests and the structure-aware mutation of the `parsers_never_panic` tests.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage};

static DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/zmesh_descriptor.bin"));

/// Why a resource could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReflectError {
    #[error("descriptor set embedded at build time is invalid: {0}")]
    Descriptors(String),
    #[error("type URL `{0}` is not a message known to zmesh-proto")]
    UnknownType(String),
    #[error("resource of type `{type_url}` does not decode: {reason}")]
    Decode { type_url: String, reason: String },
    #[error("resource of type `{type_url}` does not render as JSON: {reason}")]
    Json { type_url: String, reason: String },
    #[error("JSON is not a resource of type `{type_url}`: {reason}")]
    FromJson { type_url: String, reason: String },
}

/// The descriptors of all messages in this crate (and their imports).
pub fn pool() -> Result<&'static DescriptorPool, ReflectError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| ReflectError::Descriptors(e.clone()))
}

/// Decode `value` as the message named by `type_url` ("type.googleapis.com/pkg.Msg") and render
/// it as proto3 JSON.
pub fn to_json(type_url: &str, value: &[u8]) -> Result<serde_json::Value, ReflectError> {
    let desc = descriptor(type_url)?;
    let msg = DynamicMessage::decode(desc, value).map_err(|e| ReflectError::Decode {
        type_url: type_url.to_string(),
        reason: e.to_string(),
    })?;
    serde_json::to_value(&msg).map_err(|e| ReflectError::Json {
        type_url: type_url.to_string(),
        reason: e.to_string(),
    })
}

/// [`to_json`] for an `Any`.
pub fn any_to_json(any: &prost_types::Any) -> Result<serde_json::Value, ReflectError> {
    to_json(&any.type_url, &any.value)
}

/// Parse proto3 JSON (as [`to_json`] renders it) as the message named by `type_url` and encode
/// it.
pub fn from_json(type_url: &str, json: &serde_json::Value) -> Result<Vec<u8>, ReflectError> {
    use prost::Message;
    let msg = DynamicMessage::deserialize(descriptor(type_url)?, json).map_err(|e| {
        ReflectError::FromJson {
            type_url: type_url.to_string(),
            reason: e.to_string(),
        }
    })?;
    Ok(msg.encode_to_vec())
}

fn descriptor(type_url: &str) -> Result<prost_reflect::MessageDescriptor, ReflectError> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    pool()?
        .get_message_by_name(name)
        .ok_or_else(|| ReflectError::UnknownType(type_url.to_string()))
}
