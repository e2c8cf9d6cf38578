//! What a worker trains on and what it reports to the leader.

use std::fmt;
use std::str::FromStr;

use ringleader_proto::coordinator::{GpuInfo, WorkerResources};
use ringleader_spec::JobDevice;

/// The `--device` a worker was asked to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first CUDA device if there is one, else the CPU.
    Auto,
    Cpu,
    /// `cuda` means `cuda:0`.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim().parse::<JobDevice>()? {
            JobDevice::Auto => Self::Auto,
            JobDevice::Cpu => Self::Cpu,
            JobDevice::AnyCuda => Self::Cuda(0),
            JobDevice::Cuda(n) => Self::Cuda(n as usize),
        })
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Errors resolving a device request against this machine.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device cuda:{requested} requested, but libtorch sees {available} CUDA device(s)")]
    NoSuchCuda { requested: usize, available: usize },
    #[error("{0}")]
    Unknown(String),
}

impl DeviceRequest {
    /// The concrete device, given how many CUDA devices libtorch sees.
    pub fn resolve(self, cuda_devices: usize) -> Result<tch::Device, DeviceError> {
        match self {
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Auto if cuda_devices > 0 => Ok(tch::Device::Cuda(0)),
            Self::Auto => Ok(tch::Device::Cpu),
            Self::Cuda(n) if n < cuda_devices => Ok(tch::Device::Cuda(n)),
            Self::Cuda(n) => Err(DeviceError::NoSuchCuda {
                requested: n,
                available: cuda_devices,
            }),
        }
    }
}

/// The device a job asking for `job_device` trains on here, where the
/// worker's own device is `worker` and libtorch sees `cuda_devices`: `cpu`
/// the CPU; `auto` the worker's device; `cuda` the worker's GPU (the
/// first one if the worker itself trains on the CPU); `cuda:N` GPU N. A
/// GPU this machine lacks is an error, never a silent fall-back.
pub fn for_job(
    job_device: &str,
    worker: tch::Device,
    cuda_devices: usize,
) -> Result<tch::Device, DeviceError> {
    match job_device
        .parse::<JobDevice>()
        .map_err(DeviceError::Unknown)?
    {
        JobDevice::Auto => Ok(worker),
        JobDevice::AnyCuda if matches!(worker, tch::Device::Cuda(_)) => Ok(worker),
        JobDevice::Cpu => Ok(tch::Device::Cpu),
        JobDevice::AnyCuda => DeviceRequest::Cuda(0).resolve(cuda_devices),
        JobDevice::Cuda(n) => DeviceRequest::Cuda(n as usize).resolve(cuda_devices),
    }
}

/// How many CUDA devices libtorch sees.
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// `cpu` or `cuda:N`, as reported to the leader.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// The `count` CUDA devices libtorch sees, with names and memory where
/// NVML (present with the driver) tells them.
pub fn detect_gpus(count: usize) -> Vec<GpuInfo> {
    let nvml = if count > 0 {
        nvml_wrapper::Nvml::init().ok()
    } else {
        None
    };
    (0..count)
        .map(|index| {
            let device = nvml
                .as_ref()
                .and_then(|n| n.device_by_index(index as u32).ok());
            GpuInfo {
                index: index as u32,
                name: device
                    .as_ref()
                    .and_then(|d| d.name().ok())
                    .unwrap_or_else(|| format!("cuda:{index}")),
                memory_bytes: device
                    .as_ref()
                    .and_then(|d| d.memory_info().ok())
                    .map(|m| m.total)
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// `count` GPUs declared with `--gpus` instead of detected (hosts without
/// NVML, tests of placement): named by index, memory unknown (0).
pub fn declared_gpus(count: u32) -> Vec<GpuInfo> {
    (0..count)
        .map(|index| GpuInfo {
            index,
            name: format!("declared GPU {index}"),
            memory_bytes: 0,
        })
        .collect()
}

/// This worker's resources for registration.
pub fn resources(device: tch::Device, gpus: Vec<GpuInfo>) -> WorkerResources {
    WorkerResources {
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        gpus,
        device: device_name(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_gets_the_gpu_it_names_or_an_error() {
        use tch::Device::{Cpu, Cuda};
        // A CPU worker on a machine without CUDA.
        assert_eq!(for_job("cpu", Cpu, 0).unwrap(), Cpu);
        assert_eq!(for_job("auto", Cpu, 0).unwrap(), Cpu);
        let err = for_job("cuda:1", Cpu, 0).unwrap_err().to_string();
        assert_eq!(
            err,
            "device cuda:1 requested, but libtorch sees 0 CUDA device(s)"
        );
        assert!(for_job("cuda", Cpu, 0).is_err(), "no silent CPU fall-back");
        // A worker on GPU 1 of a two-GPU machine.
        assert_eq!(for_job("auto", Cuda(1), 2).unwrap(), Cuda(1));
        assert_eq!(for_job("cuda", Cuda(1), 2).unwrap(), Cuda(1));
        assert_eq!(for_job("cuda:0", Cuda(1), 2).unwrap(), Cuda(0));
        assert_eq!(for_job("cpu", Cuda(1), 2).unwrap(), Cpu);
        assert_eq!(for_job("cuda", Cpu, 2).unwrap(), Cuda(0));
        let err = for_job("tpu", Cpu, 2).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
    }

    #[test]
    fn declared_gpus_are_numbered() {
        let gpus = declared_gpus(2);
        let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        assert_eq!(indices, [0, 1]);
        assert_eq!(gpus[1].name, "declared GPU 1");
    }

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        let err = "gpu".parse::<DeviceRequest>().unwrap_err();
        assert!(err.contains("gpu"), "{err}");
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn auto_falls_back_to_cpu_and_cuda_must_exist() {
        assert_eq!(DeviceRequest::Auto.resolve(0).unwrap(), tch::Device::Cpu);
        assert_eq!(
            DeviceRequest::Auto.resolve(2).unwrap(),
            tch::Device::Cuda(0)
        );
        assert!(matches!(
            DeviceRequest::Cuda(1).resolve(1),
            Err(DeviceError::NoSuchCuda {
                requested: 1,
                available: 1
            })
        ));
    }
}
