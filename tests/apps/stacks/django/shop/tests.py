from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import TestCase

from shop.tasks import add


class StackTests(TestCase):
    def test_database(self):
        User.objects.create(username="someone")
        self.assertEqual(User.objects.count(), 1)

    def test_cache_is_redis(self):
        cache.set("greeting", "hello")
        self.assertEqual(cache.get("greeting"), "hello")

    def test_celery_worker_runs_tasks(self):
        # the box's worker service, through the box's Redis
        self.assertEqual(add.delay(2, 3).get(timeout=30), 5)
