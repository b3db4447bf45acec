"""Set-up steps the Rust tests do not link an SDK crate for, done with boto3 (which moto brings).

- `iam-setup`: for the credential-rotation test, against a moto server with IAM authentication on.
  moto enforces authentication after INITIAL_NO_AUTH_ACTION_COUNT requests: this makes exactly
  SETUP_REQUESTS of them (two users with allow-all policies, keys A and B for "agent", key C for
  "admin") and prints the keys as JSON.
- `delete-key USER KEY ADMIN_KEY ADMIN_SECRET`: deletes one access key, signed with the admin key.
- `ec2-instance`: runs an EC2 instance (moto's RegisterContainerInstance wants one) and prints its id.
"""
import json
import sys

import boto3

SETUP_REQUESTS = 7
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def iam(endpoint, key_id="testing", secret="testing"):
    return boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def main():
    endpoint, cmd = sys.argv[1], sys.argv[2]
    if cmd == "ec2-instance":
        ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        out = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)
        print(out["Instances"][0]["InstanceId"])
    elif cmd == "iam-setup":
        c = iam(endpoint)
        out = {}
        for user, n in (("agent", 2), ("admin", 1)):
            c.create_user(UserName=user)
            c.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=ALLOW_ALL)
            keys = [c.create_access_key(UserName=user)["AccessKey"] for _ in range(n)]
            out[user] = [[k["AccessKeyId"], k["SecretAccessKey"]] for k in keys]
        print(json.dumps(out))
    elif cmd == "delete-key":
        user, key_id, admin_id, admin_secret = sys.argv[3:7]
        iam(endpoint, admin_id, admin_secret).delete_access_key(UserName=user, AccessKeyId=key_id)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
