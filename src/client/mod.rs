//! A V2 client over the generated stubs, used by `kiln infer`, later by
//! `kiln bench`, and by the integration tests.

pub mod drift;

use std::collections::HashMap;

use std::path::PathBuf;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::security::Secret;

use crate::api::pb::{
    self, InferTensorContents, ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};

pub use crate::api::pb::infer_parameter::ParameterChoice;
pub use pb::grpc_inference_service_client::GrpcInferenceServiceClient as RawClient;

/// Why a client could not reach a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {0:?}: {1}")]
    InvalidUrl(String, String),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// TLS towards the server: the CA that signed its certificate, and for
/// mutual TLS the client's own certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How a client proves itself: TLS and an API key (or admin token).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub tls: Option<ClientTls>,
    /// Sent as `authorization: Bearer <key>` on every call.
    pub bearer: Option<Secret>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))
}

/// An HTTP/2 channel to `url` (`host:port` or `http://host:port`).
pub async fn channel(url: &str) -> Result<Channel, ClientError> {
    secure_channel(url, None).await
}

/// An HTTP/2 channel to `url`, over TLS when `tls` is given.
pub async fn secure_channel(url: &str, tls: Option<&ClientTls>) -> Result<Channel, ClientError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let full = match url.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{url}"),
    };
    let mut endpoint =
        Channel::from_shared(full).map_err(|e| ClientError::InvalidUrl(url.to_string(), e.to_string()))?;
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => return Err(ClientError::Tls("a client certificate needs its key, and a key its certificate".into())),
        }
        endpoint = endpoint.tls_config(config).map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    endpoint.tcp_nodelay(true).connect().await.map_err(|e| ClientError::Connect(url.to_string(), e))
}

/// Adds the bearer credential to every call.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(secret: Option<&Secret>) -> Result<Self, ClientError> {
        secret
            .map(|s| {
                let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {}", s.expose())
                    .parse()
                    .map_err(|_| ClientError::Tls("the API key holds characters a header cannot carry".into()))?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport under every client: a channel that adds the credential.
pub type Transport = InterceptedService<Channel, Bearer>;

/// A connected V2 client.
#[derive(Clone)]
pub struct Client {
    pub raw: GrpcInferenceServiceClient<Transport>,
}

/// Message bound for client calls; as large as the protocol lets clients go.
const CLIENT_MAX_MESSAGE_BYTES: usize = 1 << 30;

impl Client {
    /// Connects to `url` (`host:port` or `http://host:port`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Ok(Self::from_channel(channel(url).await?))
    }

    /// Connects to `url` with TLS and a credential as given.
    pub async fn connect_with(url: &str, credentials: &Credentials) -> Result<Self, ClientError> {
        let channel = secure_channel(url, credentials.tls.as_ref()).await?;
        Ok(Self::with_bearer(channel, Bearer::new(credentials.bearer.as_ref())?))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_bearer(channel, Bearer::default())
    }

    fn with_bearer(channel: Channel, bearer: Bearer) -> Self {
        let raw = GrpcInferenceServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
        Self { raw }
    }

    /// Runs one FP32 inference on `rows` of `width` values for the model's
    /// input `input`, returning the raw response.
    pub async fn infer_fp32(
        &mut self,
        model: &str,
        input: &str,
        rows: &[Vec<f32>],
    ) -> Result<pb::ModelInferResponse, tonic::Status> {
        let request = fp32_request(model, input, rows);
        Ok(self.raw.model_infer(request).await?.into_inner())
    }
}

/// A `ModelInferRequest` carrying `rows` as one FP32 input in raw form.
pub fn fp32_request(model: &str, input: &str, rows: &[Vec<f32>]) -> ModelInferRequest {
    let width = rows.first().map(Vec::len).unwrap_or(0);
    let raw: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: input.to_string(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, width as i64],
            contents: None,
            parameters: HashMap::new(),
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// A `ModelInferRequest` carrying `texts` as one BYTES input `[n]` in raw
/// form (each element a 4-byte little-endian length and its bytes).
pub fn bytes_request(model: &str, input: &str, texts: &[&[u8]]) -> ModelInferRequest {
    let mut raw = Vec::new();
    for t in texts {
        raw.extend_from_slice(&(t.len() as u32).to_le_bytes());
        raw.extend_from_slice(t);
    }
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: input.to_string(),
            datatype: "BYTES".into(),
            shape: vec![texts.len() as i64],
            contents: None,
            parameters: HashMap::new(),
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// [`bytes_request`] for UTF-8 strings.
pub fn text_request(model: &str, input: &str, texts: &[&str]) -> ModelInferRequest {
    let bytes: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    bytes_request(model, input, &bytes)
}

/// The same request with typed `contents` instead of raw bytes.
pub fn fp32_request_typed(model: &str, input: &str, rows: &[Vec<f32>]) -> ModelInferRequest {
    let mut request = fp32_request(model, input, rows);
    request.raw_input_contents.clear();
    request.inputs[0].contents =
        Some(InferTensorContents { fp32_contents: rows.iter().flatten().copied().collect(), ..Default::default() });
    request
}

/// Decodes output `index` of a response as FP32 values.
pub fn output_fp32(response: &pb::ModelInferResponse, index: usize) -> Option<Vec<f32>> {
    let raw = response.raw_output_contents.get(index)?;
    if raw.len() % 4 != 0 {
        return None;
    }
    Some(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// A response parameter as an integer, if present.
pub fn int_parameter(response: &pb::ModelInferResponse, name: &str) -> Option<i64> {
    match response.parameters.get(name)?.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => Some(v),
        Some(ParameterChoice::Uint64Param(v)) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// A response parameter as a string, if present.
pub fn string_parameter(response: &pb::ModelInferResponse, name: &str) -> Option<String> {
    match &response.parameters.get(name)?.parameter_choice {
        Some(ParameterChoice::StringParam(v)) => Some(v.clone()),
        _ => None,
    }
}

/// A client of `kiln.admin.v1.Admin` over `credentials` (the admin token
/// or an admin's key).
pub async fn admin(
    url: &str,
    credentials: &Credentials,
) -> Result<crate::api::admin_pb::admin_client::AdminClient<Transport>, ClientError> {
    let channel = secure_channel(url, credentials.tls.as_ref()).await?;
    let bearer = Bearer::new(credentials.bearer.as_ref())?;
    Ok(crate::api::admin_pb::admin_client::AdminClient::with_interceptor(channel, bearer))
}

/// The gRPC health status of `service` ("" for the server, or a model
/// name): `Ok(true)` when SERVING. Health checks need no key.
pub async fn healthy(
    url: &str,
    credentials: &Credentials,
    service: &str,
) -> Result<Result<bool, tonic::Status>, ClientError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = secure_channel(url, credentials.tls.as_ref()).await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
    Ok(client.check(request).await.map(|r| r.into_inner().status == ServingStatus::Serving as i32))
}
