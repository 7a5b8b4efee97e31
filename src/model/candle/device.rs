//! Where a candle model runs: the `device` setting (`auto`, `cpu`,
//! `cuda:N`) turned into a candle device, and its name for metadata.

use candle_core::Device;

use crate::model::{DeviceChoice, ModelError};

/// Picks the candle device for a `device` setting. `file` names the config
/// in errors; `auto` falls back to the CPU with a log line.
pub fn select_device(choice: DeviceChoice, file: &str) -> Result<Device, ModelError> {
    let config_error = |message: String| ModelError::Config(crate::config::ConfigError::new(file, message));
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = Device::new_cuda(0)
            {
                return Ok(device);
            }
            tracing::info!(file, "device = \"auto\": no CUDA device in this build or machine, running on the CPU");
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(config_error(format!(
                    "field `device`: \"cuda:{ordinal}\" needs a build with CUDA \
                     (cargo build --release --features cuda); use \"auto\" or \"cpu\""
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| config_error(format!("field `device`: cuda:{ordinal}: {e}")))
        }
    }
}

/// How the device is shown in metadata and logs.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
