//! `offload-agent iam-policy`: the least-privilege policy the host's role needs for a configuration.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::config::Config;

fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// A queue's name from a name or a URL.
fn queue_name(q: &str) -> &str {
    q.rsplit('/').next().unwrap_or(q)
}

/// Where the ARNs point: partition, region and account (`*` where not known).
struct Arns<'a> {
    part: &'a str,
    region: &'a str,
    account: &'a str,
}

impl Arns<'_> {
    fn queue(&self, q: &str) -> String {
        let Arns {
            part,
            region,
            account,
        } = self;
        format!("arn:{part}:sqs:{region}:{account}:{}", queue_name(q))
    }
}

/// The policy document. `account` defaults to any account (`*`).
pub(crate) fn policy(cfg: &Config, account: Option<&str>) -> Value {
    let region = cfg.aws.region.as_deref().unwrap_or("*");
    let arns = Arns {
        part: partition(region),
        region,
        account: account.unwrap_or("*"),
    };
    let mut statements = queue_statements(cfg, &arns);
    statements.extend(file_statements(cfg, &arns));
    statements.extend(parameter_statements(cfg, &arns));
    if cfg.ecs_agent.enabled {
        // The ECS agent's own calls on an ECS Anywhere host (as in AmazonEC2ContainerServiceforEC2Role),
        // plus the checks `register` and `deregister` make with the host's credentials.
        statements.push(json!({
            "Sid": "EcsAnywhereAgent",
            "Effect": "Allow",
            "Action": ["ecs:RegisterContainerInstance", "ecs:DeregisterContainerInstance",
                       "ecs:DescribeContainerInstances", "ecs:DiscoverPollEndpoint", "ecs:Poll",
                       "ecs:StartTelemetrySession", "ecs:PutSystemLogEvents", "ecs:SubmitAttachmentStateChanges",
                       "ecs:SubmitContainerStateChange", "ecs:SubmitTaskStateChange", "ecs:UpdateContainerInstancesState",
                       "ecs:TagResource", "ecr:GetAuthorizationToken", "ecr:BatchCheckLayerAvailability",
                       "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage", "logs:CreateLogStream",
                       "logs:PutLogEvents"],
            "Resource": "*",
        }));
        // The agent image's tarball, when it comes from S3 (a fleet's updates).
        if let Some((bucket, key)) = cfg
            .ecs_agent
            .image_url
            .as_deref()
            .and_then(crate::event::parse_s3_url)
        {
            statements.push(json!({
                "Sid": "EcsAgentImage",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [format!("arn:{}:s3:::{bucket}/{key}", arns.part)],
            }));
        }
    }
    statements.push(json!({
        "Sid": "HybridInstanceSelf",
        "Effect": "Allow",
        "Action": ["ssm:DescribeInstanceInformation", "ssm:DeregisterManagedInstance"],
        "Resource": "*",
    }));
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// Receiving from the main queue, and sending to the dead-letter queue.
fn queue_statements(cfg: &Config, arns: &Arns<'_>) -> Vec<Value> {
    let main = cfg
        .queue
        .url
        .as_deref()
        .or(cfg.queue.name.as_deref())
        .unwrap_or("*");
    let mut statements = vec![json!({
        "Sid": "ReceiveFileEvents",
        "Effect": "Allow",
        "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                   "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
        "Resource": [arns.queue(main)],
    })];
    if let Some(dlq) = &cfg.queue.dead_letter_queue {
        statements.push(json!({
            "Sid": "DeadLetter",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
            "Resource": [arns.queue(dlq)],
        }));
    }
    statements
}

/// The pipelines' inputs, outputs and tables.
fn file_statements(cfg: &Config, arns: &Arns<'_>) -> Vec<Value> {
    let Arns {
        part,
        region,
        account,
    } = arns;
    let mut read = BTreeSet::new();
    let mut write = BTreeSet::new();
    let mut tables = BTreeSet::new();
    for p in &cfg.pipelines {
        read.insert(format!("arn:{part}:s3:::{}/{}*", p.bucket, p.prefix));
        write.insert(format!(
            "arn:{part}:s3:::{}/{}*",
            p.output_bucket(),
            p.output_prefix
        ));
        if let Some(table) = &p.table {
            tables.insert(format!(
                "arn:{part}:dynamodb:{region}:{account}:table/{table}"
            ));
        }
    }
    let mut statements = vec![
        json!({
            "Sid": "ReadInputs",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:GetObjectVersion"],
            "Resource": read,
        }),
        json!({
            "Sid": "WriteOutputsAndReports",
            "Effect": "Allow",
            // DeleteObject: a stale rejects report of an earlier version; Abort: interrupted multipart.
            "Action": ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
            "Resource": write,
        }),
    ];
    if !tables.is_empty() {
        statements.push(json!({
            "Sid": "WriteOrders",
            "Effect": "Allow",
            "Action": ["dynamodb:BatchWriteItem", "dynamodb:PutItem", "dynamodb:DescribeTable"],
            "Resource": tables,
        }));
    }
    statements
}

/// Reading configuration from Parameter Store, SecureStrings included.
fn parameter_statements(cfg: &Config, arns: &Arns<'_>) -> Vec<Value> {
    let Some(path) = &cfg.ssm.parameters_path else {
        return Vec::new();
    };
    let Arns {
        part,
        region,
        account,
    } = arns;
    let path = path.trim_end_matches('/');
    vec![
        json!({
            "Sid": "ConfigurationFromParameterStore",
            "Effect": "Allow",
            "Action": ["ssm:GetParametersByPath", "ssm:GetParameters", "ssm:GetParameter"],
            "Resource": [
                format!("arn:{part}:ssm:{region}:{account}:parameter{path}"),
                format!("arn:{part}:ssm:{region}:{account}:parameter{path}/*"),
            ],
        }),
        json!({
            "Sid": "DecryptSecureStrings",
            "Effect": "Allow",
            "Action": ["kms:Decrypt"],
            "Resource": [format!("arn:{part}:kms:{region}:{account}:key/*")],
            "Condition": {"StringEquals": {"kms:ViaService": format!("ssm.{region}.amazonaws.com")}},
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_follow_the_configuration() {
        let cfg = crate::config::from_toml_str(
            "[aws]\nregion='eu-west-1'\n[queue]\nname='q'\ndead_letter_queue='q-dlq'\n[ssm]\nparameters_path='/oa/prod'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='T'\noutput_prefix='out/'\n",
            "t.toml",
        )
        .unwrap();
        let text = policy(&cfg, Some("123456789012")).to_string();
        for want in [
            "arn:aws:sqs:eu-west-1:123456789012:q\"",
            "arn:aws:sqs:eu-west-1:123456789012:q-dlq",
            "arn:aws:s3:::b/in/*",
            "arn:aws:s3:::b/out/*",
            "arn:aws:dynamodb:eu-west-1:123456789012:table/T",
            "parameter/oa/prod/*",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(!text.contains("EcsAgentImage"), "{text}");
    }

    #[test]
    fn the_agent_tarball_from_s3_is_readable() {
        let cfg = crate::config::from_toml_str(
            &format!("[aws]\nregion='eu-west-1'\n[queue]\nname='q'\n[ecs_agent]\nimage_url='s3://fleet/agents/v2.tar'\nimage_sha256='{}'\n[[pipeline]]\nname='p'\nbucket='b'\nprefix='in/'\nprocessor='orders-csv'\ntable='T'\noutput_prefix='out/'\n", "a".repeat(64)),
            "t.toml",
        )
        .unwrap();
        let text = policy(&cfg, None).to_string();
        assert!(
            text.contains("\"arn:aws:s3:::fleet/agents/v2.tar\""),
            "{text}"
        );
    }
}
