"""The audit archive: an S3 bucket the gateway ships sealed journal segments to."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from fortress.config import DeployArchive
from fortress.deploy.aws.nag import skip_checkov


class Archive(Construct):
    """Encrypted (SSE-KMS), versioned, private, TLS only; to Glacier after ``glacier_after_days``."""

    def __init__(self, scope: Construct, cid: str, archive: DeployArchive) -> None:
        super().__init__(scope, cid)
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,  # server access logs cannot go to a KMS bucket
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(365))],
        )
        skip_checkov(
            self.access_logs,
            {"CKV_AWS_18": "The bucket that receives the access logs: logging it to itself would loop."},
        )
        rules = [
            s3.LifecycleRule(
                transitions=[
                    s3.Transition(
                        storage_class=s3.StorageClass.GLACIER,
                        transition_after=Duration.days(archive.glacier_after_days),
                    )
                ],
                expiration=Duration.days(archive.expire_after_days) if archive.expire_after_days else None,
            )
        ]
        lock = archive.object_lock_days
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            encryption=s3.BucketEncryption.KMS,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            lifecycle_rules=rules,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="archive/",
            # An audit trail outlives the stack: destroying it never deletes the records.
            removal_policy=RemovalPolicy.RETAIN,
            object_lock_enabled=bool(lock),
            object_lock_default_retention=s3.ObjectLockRetention.compliance(Duration.days(lock))
            if lock
            else None,
        )
