//! A local stand-in for the two SSM APIs the AWS emulator lacks (moto implements neither
//! `DescribeInstanceInformation` nor `DeregisterManagedInstance`): an HTTP server speaking the SSM JSON
//! protocol on 127.0.0.1 that reports one managed instance online until it is deregistered, and records
//! each call with the access key id that signed it. It also answers ECS's
//! `DescribeContainerInstances` with the connection `set_ecs_connected` gives (moto's always says
//! connected, so a disconnected agent cannot be shown with it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub target: String,
    pub access_key_id: String,
}

pub struct SsmStub {
    pub endpoint: String,
    pub calls: Arc<Mutex<Vec<Call>>>,
    ecs_connected: Arc<Mutex<bool>>,
}

impl SsmStub {
    /// Serve `instance` (online until deregistered) on a free port.
    pub fn start(instance: &str) -> SsmStub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let online = Arc::new(Mutex::new(true));
        let ecs_connected = Arc::new(Mutex::new(true));
        let (c, i, e) = (calls.clone(), instance.to_string(), ecs_connected.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, i, o, e) = (c.clone(), i.clone(), online.clone(), e.clone());
                std::thread::spawn(move || serve(stream, &i, &c, &o, &e));
            }
        });
        SsmStub {
            endpoint,
            calls,
            ecs_connected,
        }
    }

    /// What `DescribeContainerInstances` reports as `agentConnected` from now on.
    pub fn set_ecs_connected(&self, connected: bool) {
        *self.ecs_connected.lock().unwrap() = connected;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    instance: &str,
    calls: &Mutex<Vec<Call>>,
    online: &Mutex<bool>,
    ecs_connected: &Mutex<bool>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            headers.push(line.trim_end().to_string());
        }
        let header = |name: &str| {
            headers.iter().find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let target = header("x-amz-target").unwrap_or_default();
        let access_key_id = header("authorization")
            .and_then(|a| {
                let cred = a.split("Credential=").nth(1)?;
                Some(cred.split('/').next()?.to_string())
            })
            .unwrap_or_default();
        calls.lock().unwrap().push(Call {
            target: target.clone(),
            access_key_id,
        });
        let (status, reply) = match target.as_str() {
            "AmazonSSM.DescribeInstanceInformation" => {
                let list = if *online.lock().unwrap() {
                    format!(r#"[{{"InstanceId":"{instance}","PingStatus":"Online"}}]"#)
                } else {
                    "[]".to_string()
                };
                ("200 OK", format!(r#"{{"InstanceInformationList":{list}}}"#))
            }
            "AmazonSSM.DeregisterManagedInstance" => {
                let mut o = online.lock().unwrap();
                if *o {
                    *o = false;
                    ("200 OK", "{}".to_string())
                } else {
                    (
                        "400 Bad Request",
                        r#"{"__type":"InvalidInstanceId","message":"no such instance"}"#
                            .to_string(),
                    )
                }
            }
            "AmazonEC2ContainerServiceV20141113.DescribeContainerInstances" => {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let list: Vec<_> = req["containerInstances"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|arn| {
                        serde_json::json!({
                            "containerInstanceArn": arn,
                            "agentConnected": *ecs_connected.lock().unwrap(),
                            "status": "ACTIVE"
                        })
                    })
                    .collect();
                (
                    "200 OK",
                    serde_json::json!({"containerInstances": list, "failures": []}).to_string(),
                )
            }
            _ => (
                "400 Bad Request",
                r#"{"__type":"UnknownOperationException","message":"not in the stub"}"#.to_string(),
            ),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
