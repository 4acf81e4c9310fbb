"""Settings from the environment, the twelve-factor way: compose.yaml sets it for docker compose."""
import os
from urllib.parse import urlsplit

SECRET_KEY = os.environ.get("SECRET_KEY", "dev")
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "proj.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
USE_TZ = True

_db = urlsplit(os.environ["DATABASE_URL"])
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _db.path.lstrip("/"),
                         "USER": _db.username, "PASSWORD": _db.password, "HOST": _db.hostname,
                         "PORT": _db.port or 5432}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                      "LOCATION": os.environ["REDIS_URL"]}}
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_RESULT_BACKEND = os.environ["CELERY_RESULT_BACKEND"]
